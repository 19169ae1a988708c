//! A volume through the block-device adapter: what each request does, and
//! the error numbers clients see.

use hlfs_device::{nbd_errno, VolumeDevice};
use hlfs_nbd::proto::{EINVAL, EIO, EPERM};
use hlfs_nbd::BlockDevice;
use hlfs_store::MemEnv;
use hlfs_volume::{Backend, CreateOptions, ErrorKind, OpenOptions, View, Volume};

async fn volume(env: &MemEnv) -> Volume {
    let create = CreateOptions {
        size: 4 << 20,
        segment_size: 1 << 20,
        ..CreateOptions::default()
    };
    Volume::create(&Backend::memory(env), &create)
        .await
        .unwrap();
    Volume::open(Backend::memory(env), &OpenOptions::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn requests_reach_the_volume_and_errors_carry_their_errno() {
    let env = MemEnv::new();
    let vol = volume(&env).await;
    let dev = VolumeDevice::new(vol.clone());
    assert_eq!(dev.size(), 4 << 20);
    assert_eq!(dev.block_size(), 4096);
    assert!(!dev.read_only());
    dev.write(8192, &[7u8; 8192], true).await.unwrap();
    dev.write_zeroes(0, 4096, true).await.unwrap();
    let mut buf = vec![0u8; 8192];
    dev.read(8192, &mut buf).await.unwrap();
    assert_eq!(buf, vec![7u8; 8192]);
    // NO_HOLE zeroing keeps the space; plain zeroing and trim release it.
    let runs = || async {
        let runs = dev.extents(0, 16384).await.unwrap();
        runs.iter()
            .map(|r| (r.len, r.allocated))
            .collect::<Vec<_>>()
    };
    assert_eq!(runs().await, [(4096, true), (4096, false), (8192, true)]);
    dev.trim(8192, 4096).await.unwrap();
    dev.write_zeroes(12288, 4096, false).await.unwrap();
    assert_eq!(runs().await, [(4096, true), (12288, false)]);
    dev.flush().await.unwrap();
    let past_end = dev.read(4 << 20, &mut buf).await.unwrap_err();
    assert_eq!(past_end.errno, EINVAL, "{}", past_end.message);
    vol.snapshot_create("s").await.unwrap();
    let snap = Volume::open_read_only(
        Backend::memory(&env),
        &OpenOptions::default(),
        View::Snapshot("s".into()),
    )
    .await
    .unwrap();
    let snap = VolumeDevice::new(snap);
    assert!(snap.read_only());
    let refused = snap.write(0, &[1], false).await.unwrap_err();
    assert_eq!(refused.errno, EPERM);
    vol.close().await.unwrap();
    let closed = dev.write(0, &[1], false).await.unwrap_err();
    assert_eq!(closed.errno, EIO);
    assert!(closed.message.contains("closed"), "{}", closed.message);
}

#[test]
fn every_kind_has_an_nbd_errno() {
    use ErrorKind::*;
    for (kind, errno) in [
        (NotFound, EIO),
        (AlreadyExists, EIO),
        (Busy, EIO),
        (InvalidInput, EINVAL),
        (OutOfRange, EINVAL),
        (ReadOnly, EPERM),
        (Unavailable, EIO),
        (Corrupt, EIO),
        (Io, EIO),
        (Closed, EIO),
    ] {
        assert_eq!(nbd_errno(kind), errno, "{kind:?}");
    }
}
