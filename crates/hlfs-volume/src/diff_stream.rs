//! Diffs as RBD diff streams (`hlfs export-diff`, `hlfs import-diff`):
//! what changed between two roots, written with the data it holds, and
//! such a stream applied to a volume all or nothing (docs/design/diffs.md).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use hlfs_format::rbd_diff::{DiffDecoder, DiffEvent, DiffRecord};

use hlfs_store::StoreError;

use crate::diff::DiffExtent;
use crate::error::{Result, VolumeError};
use crate::snapshot::validate_snapshot_name;
use crate::volume::Volume;

/// Data is read, and written, at most this much at a time.
const CHUNK: u64 = 4 << 20;

/// What an export or import moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiffStreamReport {
    pub from: Option<String>,
    pub to: Option<String>,
    pub size: u64,
    /// Bytes of data records, and bytes the zero records cover.
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// Writes to `out` the changes of `vol` since snapshot `from` (or, without
/// it, everything `vol` holds) as an RBD diff stream: the head of a
/// writable volume as of the call, or the snapshot a read-only view shows.
/// `progress` hears the bytes of extents written so far, of `total`.
pub async fn export_diff<W: AsyncWrite + Unpin>(
    vol: &Volume,
    from: Option<&str>,
    mut out: W,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<DiffStreamReport> {
    let size = vol.size();
    let extents: Vec<DiffExtent> = match from {
        Some(from) => vol.changes_since(from).await?.extents.clone(),
        None => vol
            .extents(0, size, usize::MAX)
            .await?
            .into_iter()
            .filter(|x| x.data)
            .map(|x| DiffExtent {
                offset: x.offset,
                len: x.len,
                zero: false,
            })
            .collect(),
    };
    let total: u64 = extents.iter().map(|x| x.len).sum();
    let mut report = DiffStreamReport {
        from: from.map(str::to_string),
        to: vol.snapshot().map(str::to_string),
        size,
        ..DiffStreamReport::default()
    };
    let mut head = hlfs_format::rbd_diff::BANNER.to_vec();
    if let Some(from) = &report.from {
        head.extend(DiffRecord::FromSnapshot(from.clone()).encode());
    }
    if let Some(to) = &report.to {
        head.extend(DiffRecord::ToSnapshot(to.clone()).encode());
    }
    head.extend(DiffRecord::Size(size).encode());
    out.write_all(&head).await.map_err(stream_io)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut done = 0;
    for x in &extents {
        if x.zero {
            let record = DiffRecord::Zero {
                offset: x.offset,
                len: x.len,
            };
            out.write_all(&record.encode()).await.map_err(stream_io)?;
            report.zero_bytes += x.len;
            done += x.len;
            progress(done, total);
            continue;
        }
        let mut at = x.offset;
        while at < x.offset + x.len {
            let n = (x.offset + x.len - at).min(CHUNK);
            let data = &mut buf[..n as usize];
            vol.read_into(at, data).await?;
            let record = DiffRecord::DataHeader { offset: at, len: n };
            out.write_all(&record.encode()).await.map_err(stream_io)?;
            out.write_all(data).await.map_err(stream_io)?;
            at += n;
            report.data_bytes += n;
            done += n;
            progress(done, total);
        }
    }
    out.write_all(&DiffRecord::End.encode())
        .await
        .map_err(stream_io)?;
    out.flush().await.map_err(stream_io)?;
    Ok(report)
}

/// Applies the RBD diff stream `input` to `vol`'s head, all or nothing:
/// the head (and its size) is kept as a guard first, and if the stream is
/// refused (malformed, cut off, a from-snapshot the volume lacks, a
/// to-snapshot it has) or anything fails, the head goes back to it; after
/// a crash, the next open does that. On success the head holds the
/// stream's changes and, if the stream names one, snapshot `to` holds the
/// same. `progress` hears the stream's bytes read so far.
pub async fn import_diff<R: AsyncRead + Unpin>(
    vol: &Volume,
    mut input: R,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<DiffStreamReport> {
    let mut report = DiffStreamReport::default();
    let mut decoder = DiffDecoder::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut read = 0u64;
    // Stream bytes not yet decoded.
    let (mut start, mut end) = (0, 0);
    let mut guarded = false;
    let mut sized = false;
    let mut pending = Pending::default();
    let applied: Result<()> = async {
        loop {
            if start == end {
                let n = input.read(&mut buf).await.map_err(stream_io)?;
                if n == 0 {
                    decoder.finish().map_err(bad_stream)?;
                    break;
                }
                (start, end) = (0, n);
                read += n as u64;
                progress(read);
            }
            let (used, event) = decoder.next(&buf[start..end]).map_err(bad_stream)?;
            let event = event.map(owned);
            start += used;
            let Some(event) = event else { continue };
            match event {
                Owned::From(name) => report.from = Some(name),
                Owned::To(name) => report.to = Some(name),
                Owned::Size(size) => {
                    report.size = size;
                    sized = true;
                }
                Owned::End => {}
                Owned::Data { .. } | Owned::Zero { .. } if !guarded => {
                    start_import(vol, &report).await?;
                    guarded = true;
                    apply(vol, &mut pending, event, &mut report).await?;
                }
                event => apply(vol, &mut pending, event, &mut report).await?,
            }
            if decoder.ended() && !guarded {
                if !sized {
                    return Err(VolumeError::InvalidArgument(
                        "bad diff stream: it gives no image size".into(),
                    ));
                }
                // A stream with no changes still makes its snapshot.
                start_import(vol, &report).await?;
                guarded = true;
            }
        }
        pending.write(vol).await?;
        vol.flush().await
    }
    .await;
    match applied {
        Ok(()) => {
            vol.core.end_import(Some(report.to.as_deref())).await?;
            Ok(report)
        }
        Err(e) if guarded => {
            if let Err(undo) = vol.core.end_import(None).await {
                tracing::error!(error = %undo, "could not roll back a failed import; the next open will");
            }
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// An error of the stream's reader or writer (a file, a pipe).
fn stream_io(source: std::io::Error) -> VolumeError {
    VolumeError::Store(StoreError::Io {
        name: "the diff stream".into(),
        source,
    })
}

fn bad_stream(e: hlfs_format::rbd_diff::DiffStreamError) -> VolumeError {
    VolumeError::InvalidArgument(format!("bad diff stream: {e}"))
}

/// Checks what the stream's metadata asks of the volume, then keeps the
/// head as the guard and grows the volume to the stream's size.
async fn start_import(vol: &Volume, report: &DiffStreamReport) -> Result<()> {
    let snapshots = vol.snapshots();
    if let Some(from) = &report.from {
        if !snapshots.iter().any(|s| &s.name == from) {
            return Err(VolumeError::InvalidArgument(format!(
                "{} has no snapshot {from:?}, which this diff starts from",
                vol.location()
            )));
        }
    }
    if let Some(to) = &report.to {
        validate_snapshot_name(to)?;
        if snapshots.iter().any(|s| &s.name == to) {
            return Err(VolumeError::SnapshotExists(to.clone()));
        }
    }
    if report.size < vol.size() {
        return Err(VolumeError::InvalidArgument(format!(
            "the diff's image is {} bytes, smaller than the volume's {}: volumes do not shrink",
            report.size,
            vol.size()
        )));
    }
    vol.core.begin_import().await?;
    if report.size > vol.size() {
        vol.resize(report.size).await?;
    }
    Ok(())
}

/// A stream event, its data copied out of the read buffer.
enum Owned {
    From(String),
    To(String),
    Size(u64),
    Data { offset: u64, bytes: Vec<u8> },
    Zero { offset: u64, len: u64 },
    End,
}

fn owned(e: DiffEvent<'_>) -> Owned {
    match e {
        DiffEvent::FromSnapshot(n) => Owned::From(n),
        DiffEvent::ToSnapshot(n) => Owned::To(n),
        DiffEvent::Size(s) => Owned::Size(s),
        DiffEvent::Data { offset, bytes } => Owned::Data {
            offset,
            bytes: bytes.to_vec(),
        },
        DiffEvent::Zero { offset, len } => Owned::Zero { offset, len },
        DiffEvent::End => Owned::End,
    }
}

/// Data gathered into one write: the stream gives it in read-sized pieces.
#[derive(Default)]
struct Pending {
    offset: u64,
    bytes: Vec<u8>,
}

impl Pending {
    async fn write(&mut self, vol: &Volume) -> Result<()> {
        if !self.bytes.is_empty() {
            vol.write(self.offset, &self.bytes).await?;
            self.bytes.clear();
        }
        Ok(())
    }
}

async fn apply(
    vol: &Volume,
    pending: &mut Pending,
    event: Owned,
    report: &mut DiffStreamReport,
) -> Result<()> {
    match event {
        Owned::Data { offset, bytes } => {
            report.data_bytes += bytes.len() as u64;
            let follows = pending.offset + pending.bytes.len() as u64 == offset;
            if !follows || pending.bytes.len() as u64 >= CHUNK {
                pending.write(vol).await?;
                pending.offset = offset;
            }
            pending.bytes.extend_from_slice(&bytes);
        }
        Owned::Zero { offset, len } => {
            report.zero_bytes += len;
            pending.write(vol).await?;
            vol.write_zeroes(offset, len).await?;
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use hlfs_store::MemEnv;

    use super::*;
    use crate::backend::Backend;
    use crate::options::{CreateOptions, OpenOptions, View};

    const MIB: u64 = 1 << 20;

    async fn volume(env: &MemEnv, size: u64) -> (Backend, Volume) {
        let backend = Backend::memory(env);
        let create = CreateOptions {
            size,
            ..CreateOptions::default()
        };
        Volume::create(&backend, &create).await.unwrap();
        let vol = Volume::open(backend.clone(), &OpenOptions::default())
            .await
            .unwrap();
        (backend, vol)
    }

    async fn image(vol: &Volume) -> Vec<u8> {
        vol.read(0, vol.size() as usize).await.unwrap()
    }

    async fn snapshot_image(backend: &Backend, name: &str) -> Vec<u8> {
        let view = View::Snapshot(name.to_string());
        let view = Volume::open_read_only(backend.clone(), &OpenOptions::default(), view)
            .await
            .unwrap();
        image(&view).await
    }

    async fn export(backend: &Backend, snap: &str, from: Option<&str>) -> Vec<u8> {
        let view = View::Snapshot(snap.to_string());
        let view = Volume::open_read_only(backend.clone(), &OpenOptions::default(), view)
            .await
            .unwrap();
        let mut out = Vec::new();
        export_diff(&view, from, &mut out, &|_, _| {})
            .await
            .unwrap();
        out
    }

    fn names(vol: &Volume) -> Vec<String> {
        vol.snapshots().into_iter().map(|s| s.name).collect()
    }

    /// A source volume with snapshots s1 and s2 (grown in between), and
    /// a replica that took s1 whole.
    async fn source_and_replica() -> (Backend, Volume, Vec<u8>) {
        let (src_env, dst_env) = (MemEnv::new(), MemEnv::new());
        let (src, a) = volume(&src_env, 4 * MIB).await;
        a.write(0, &vec![0x11; 3 * MIB as usize]).await.unwrap();
        a.snapshot_create("s1").await.unwrap();
        // Unaligned data, a trim, zeros, and growth.
        a.write(12345, &[0x22; 7000]).await.unwrap();
        a.trim(MIB, 256 << 10).await.unwrap();
        a.write_zeroes(2 * MIB + 512, 5000).await.unwrap();
        a.resize(6 * MIB).await.unwrap();
        a.write(5 * MIB, &[0x33; 4096]).await.unwrap();
        a.snapshot_create("s2").await.unwrap();
        let (_dst, b) = volume(&dst_env, 4 * MIB).await;
        let full = export(&src, "s1", None).await;
        let r = import_diff(&b, &full[..], &|_| {}).await.unwrap();
        assert_eq!(
            (r.from, r.to.as_deref(), r.size),
            (None, Some("s1"), 4 * MIB)
        );
        assert_eq!(r.data_bytes, 3 * MIB);
        assert_eq!(image(&b).await, snapshot_image(&src, "s1").await);
        assert_eq!(names(&b), ["s1"]);
        let incremental = export(&src, "s2", Some("s1")).await;
        a.close().await.unwrap();
        (src, b, incremental)
    }

    #[tokio::test]
    async fn a_replica_follows_its_source_diff_by_diff() {
        let (src, b, incremental) = source_and_replica().await;
        let r = import_diff(&b, &incremental[..], &|_| {}).await.unwrap();
        assert_eq!(r.to.as_deref(), Some("s2"));
        assert_eq!(b.size(), 6 * MIB);
        let s2 = snapshot_image(&src, "s2").await;
        assert_eq!(image(&b).await, s2);
        assert_eq!(names(&b), ["s1", "s2"]);
        // The replica's own diff is the source's.
        let replica = b.changes_since("s1").await.unwrap();
        let source = crate::diff(src, "s1", Some("s2"), false).await.unwrap();
        assert_eq!(replica.extents, source.extents);
        // Applying it twice is refused: s2 is there.
        let err = import_diff(&b, &incremental[..], &|_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, VolumeError::SnapshotExists(_)), "{err}");
        assert_eq!(image(&b).await, s2);
    }

    #[tokio::test]
    async fn a_bad_stream_leaves_the_volume_as_it_was() {
        let (_src, b, incremental) = source_and_replica().await;
        b.write(0, &[0x44; 4096]).await.unwrap();
        let before = image(&b).await;
        let check = |what: String, err: VolumeError, b: &Volume| {
            assert_eq!(b.size(), 4 * MIB, "{what}: {err}");
            assert_eq!(names(b), ["s1"], "{what}: {err}");
        };
        // Cut anywhere: in the banner, the metadata, a data record's bytes,
        // just before the end record.
        let len = incremental.len();
        for cut in [5, 20, 40, 3000, len / 2, len - 1] {
            let err = import_diff(&b, &incremental[..cut], &|_| {})
                .await
                .unwrap_err();
            assert!(err.to_string().contains("bad diff stream"), "{err}");
            check(format!("cut at {cut}"), err, &b);
            assert_eq!(image(&b).await, before, "cut at {cut}");
        }
        // Damaged: an unknown tag where the second data record starts, and
        // bytes after the end.
        let mut damaged = incremental.clone();
        let first = 12 + 7 + 7 + 9;
        assert_eq!(damaged[first], b'w');
        let first_len = u64::from_le_bytes(damaged[first + 9..first + 17].try_into().unwrap());
        let second = first + 17 + first_len as usize;
        damaged[second] = b'?';
        let err = import_diff(&b, &damaged[..], &|_| {}).await.unwrap_err();
        assert!(err.to_string().contains("unknown record tag"), "{err}");
        check("damaged".into(), err, &b);
        let mut longer = incremental.clone();
        longer.push(0);
        let err = import_diff(&b, &longer[..], &|_| {}).await.unwrap_err();
        check("longer".into(), err, &b);
        assert_eq!(image(&b).await, before);
        // A from-snapshot the volume lacks.
        let mut other = hlfs_format::rbd_diff::BANNER.to_vec();
        other.extend(DiffRecord::FromSnapshot("s0".into()).encode());
        other.extend(DiffRecord::Size(4 * MIB).encode());
        other.extend(DiffRecord::End.encode());
        let err = import_diff(&b, &other[..], &|_| {}).await.unwrap_err();
        assert!(err.to_string().contains("no snapshot \"s0\""), "{err}");
        check("from s0".into(), err, &b);
        assert_eq!(image(&b).await, before);
        // After all that, the stream applies.
        import_diff(&b, &incremental[..], &|_| {}).await.unwrap();
        assert_eq!(names(&b), ["s1", "s2"]);
    }

    #[tokio::test]
    async fn an_import_cut_off_by_a_crash_is_rolled_back_on_open() {
        let env = MemEnv::new();
        let (backend, vol) = volume(&env, 4 * MIB).await;
        vol.write(0, &[1; 4096]).await.unwrap();
        let before = image(&vol).await;
        vol.core.begin_import().await.unwrap();
        vol.write(0, &[2; 8192]).await.unwrap();
        vol.flush().await.unwrap();
        drop(vol);
        let vol = Volume::open(backend, &OpenOptions::default())
            .await
            .unwrap();
        assert_eq!(image(&vol).await, before);
        assert!(names(&vol).is_empty());
        vol.close().await.unwrap();
    }
}
