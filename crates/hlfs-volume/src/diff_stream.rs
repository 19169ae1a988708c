//! Diffs as RBD diff streams (`hlfs export-diff`, `hlfs import-diff`):
//! what changed between two roots, written with the data it holds, and
//! such a stream applied to a volume all or nothing (docs/design/diffs.md).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use hlfs_format::rbd_diff::{
    DiffDecoder, DiffEvent, DiffRecord, DiffStreamError, ImageHeader, BANNER, BANNER_V2,
    IMAGE_BANNER,
};

use hlfs_store::StoreError;

use crate::diff::DiffExtent;
use crate::error::{Result, VolumeError};
use crate::snapshot::{validate_snapshot_name, IMPORT_GUARD};
use crate::volume::Volume;

/// Data is read, and written, at most this much at a time.
const CHUNK: u64 = 4 << 20;

/// What an export or import moved.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffStreamReport {
    pub from: Option<String>,
    pub to: Option<String>,
    pub size: u64,
    /// Bytes of data records, and bytes the zero records cover.
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Diff streams moved: 1, or for an RBD image one per snapshot and
    /// one for the head (`to` is then its last snapshot).
    #[serde(default)]
    pub diffs: u64,
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
    let report = write_diff(vol, from, &mut out, 1, progress).await?;
    out.flush().await.map_err(stream_io)?;
    Ok(report)
}

/// Writes to `out` the volume `vol` (a writable one's head, as of the
/// call) with all its snapshots, as `rbd export --export-format 2` writes
/// an image: a header, then a version 2 diff per snapshot, each from the
/// one before (the first from nothing), then one from the last snapshot
/// to the head. `rbd import --export-format 2` makes an image of it with
/// the same snapshots, and `import_diff` a volume. Snapshot views are
/// opened with `opts`. `progress` hears each diff's bytes in turn.
pub async fn export_image<W: AsyncWrite + Unpin>(
    vol: &Volume,
    opts: &crate::OpenOptions,
    mut out: W,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<DiffStreamReport> {
    let names: Vec<String> = vol
        .snapshots()
        .into_iter()
        .map(|s| s.name)
        .filter(|n| n != IMPORT_GUARD)
        .collect();
    // RBD's default object size, 4 MiB: it only shapes the image made.
    let header = ImageHeader::encode(22, names.len() as u64 + 1);
    out.write_all(&header).await.map_err(stream_io)?;
    let backend = vol.core().backend.clone();
    let mut total = DiffStreamReport::default();
    let mut from: Option<String> = None;
    for name in &names {
        let view =
            Volume::open_read_only(backend.clone(), opts, crate::View::Snapshot(name.clone()))
                .await?;
        let report = write_diff(&view, from.as_deref(), &mut out, 2, progress).await?;
        total.add(&report);
        from = Some(name.clone());
    }
    let report = write_diff(vol, from.as_deref(), &mut out, 2, progress).await?;
    total.add(&report);
    out.flush().await.map_err(stream_io)?;
    Ok(total)
}

impl DiffStreamReport {
    /// Adds the next diff of an image: its bytes, and what it ends at.
    fn add(&mut self, next: &DiffStreamReport) {
        if next.to.is_some() {
            self.to.clone_from(&next.to);
        }
        self.size = next.size;
        self.diffs += next.diffs;
        self.data_bytes += next.data_bytes;
        self.zero_bytes += next.zero_bytes;
    }
}

/// Writes one diff stream of `version` (1 or 2); see `export_diff`.
async fn write_diff<W: AsyncWrite + Unpin>(
    vol: &Volume,
    from: Option<&str>,
    out: &mut W,
    version: u8,
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
        diffs: 1,
        ..DiffStreamReport::default()
    };
    let mut head = match version {
        1 => BANNER.to_vec(),
        _ => BANNER_V2.to_vec(),
    };
    if let Some(from) = &report.from {
        head.extend(DiffRecord::FromSnapshot(from.clone()).encode_for(version));
    }
    if let Some(to) = &report.to {
        head.extend(DiffRecord::ToSnapshot(to.clone()).encode_for(version));
        if version == 2 {
            head.extend(DiffRecord::protection_v2(false));
        }
    }
    head.extend(DiffRecord::Size(size).encode_for(version));
    out.write_all(&head).await.map_err(stream_io)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut done = 0;
    for x in &extents {
        if x.zero {
            let record = DiffRecord::Zero {
                offset: x.offset,
                len: x.len,
            };
            out.write_all(&record.encode_for(version))
                .await
                .map_err(stream_io)?;
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
            out.write_all(&record.encode_for(version))
                .await
                .map_err(stream_io)?;
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
    Ok(report)
}

/// An error of the stream's reader or writer (a file, a pipe).
fn stream_io(source: std::io::Error) -> VolumeError {
    VolumeError::Store(StoreError::Io {
        name: "the diff stream".into(),
        source,
    })
}

/// Applies the RBD diff stream `input` to `vol`'s head, all or nothing.
/// The stream must fit the volume: a stream from snapshot F applies to a
/// head that has not changed since F, and a stream from nothing to a
/// volume that holds no data. Its to-snapshot must be new. The head (and
/// its size) is then kept as a guard, and if the stream turns out bad
/// (malformed, cut off) or anything fails, the head goes back to it;
/// after a crash, the next writable open does that. On success the head
/// holds the stream's changes and, if the stream names one, snapshot `to`
/// holds the same. `progress` hears the stream's bytes read so far.
///
/// `input` may also be an image as `rbd export --export-format 2` writes
/// it (`export_image`): its diffs are applied in turn, each all or
/// nothing, to a volume that holds no data, which ends with the image's
/// snapshots and head. If one fails, those before it stay, and the error
/// names them.
pub async fn import_diff<R: AsyncRead + Unpin>(
    vol: &Volume,
    input: R,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<DiffStreamReport> {
    let mut src = Source::new(input);
    // Enough to tell an image from a diff.
    while src.pending().len() < IMAGE_BANNER.len() && src.fill(progress).await? {}
    if src.pending().starts_with(IMAGE_BANNER) {
        return import_image(vol, &mut src, progress).await;
    }
    import_one(vol, &mut src, progress, true).await
}

/// The stream being read: its reader, and bytes read not yet decoded.
struct Source<R> {
    input: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    read: u64,
}

impl<R: AsyncRead + Unpin> Source<R> {
    fn new(input: R) -> Self {
        Source {
            input,
            buf: vec![0u8; 256 << 10],
            start: 0,
            end: 0,
            read: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
    }

    /// Reads more after what is pending; false at the stream's end.
    async fn fill(&mut self, progress: &(dyn Fn(u64) + Send + Sync)) -> Result<bool> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // A header longer than the buffer (ImageHeader bounds it).
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self
            .input
            .read(&mut self.buf[self.end..])
            .await
            .map_err(stream_io)?;
        self.end += n;
        self.read += n as u64;
        progress(self.read);
        Ok(n > 0)
    }
}

/// Applies an image's diffs in turn (see `import_diff`).
async fn import_image<R: AsyncRead + Unpin>(
    vol: &Volume,
    src: &mut Source<R>,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<DiffStreamReport> {
    let header = loop {
        match ImageHeader::parse(src.pending()).map_err(bad_stream)? {
            Some((len, header)) => {
                src.consume(len);
                break header;
            }
            None if src.fill(progress).await? => {}
            None => return Err(bad_stream(DiffStreamError::CutOff(src.read))),
        }
    };
    if header.diffs == 0 {
        return Err(VolumeError::InvalidArgument(
            "bad RBD image: it holds no diff".into(),
        ));
    }
    let mut total = DiffStreamReport::default();
    let mut kept: Vec<String> = Vec::new();
    for k in 1..=header.diffs {
        let report = match import_one(vol, src, progress, false).await {
            Ok(report) => report,
            Err(VolumeError::InvalidArgument(e)) if k > 1 => {
                return Err(VolumeError::InvalidArgument(format!(
                    "diff {k} of the image's {}: {e}; the {} before it were imported (snapshots {})",
                    header.diffs,
                    k - 1,
                    kept.join(", ")
                )))
            }
            Err(e) => return Err(e),
        };
        kept.extend(report.to.clone());
        total.add(&report);
    }
    while src.pending().is_empty() && src.fill(progress).await? {}
    if !src.pending().is_empty() {
        return Err(VolumeError::InvalidArgument(format!(
            "bad RBD image: bytes after its last diff, at byte {} (its {} diffs were imported)",
            src.read - src.pending().len() as u64,
            header.diffs
        )));
    }
    Ok(total)
}

/// Applies one diff stream of `src`, all or nothing (see `import_diff`).
/// With `whole`, the stream is all of `src`: nothing may follow its end.
async fn import_one<R: AsyncRead + Unpin>(
    vol: &Volume,
    src: &mut Source<R>,
    progress: &(dyn Fn(u64) + Send + Sync),
    whole: bool,
) -> Result<DiffStreamReport> {
    let mut report = DiffStreamReport {
        diffs: 1,
        ..DiffStreamReport::default()
    };
    let mut decoder = DiffDecoder::new();
    let mut guard = Guard::None;
    let mut sized = false;
    let mut pending = Pending::default();
    let applied: Result<()> = async {
        loop {
            if src.pending().is_empty() && !src.fill(progress).await? {
                decoder.finish().map_err(bad_stream)?;
                break;
            }
            let (used, event) = decoder.next(src.pending()).map_err(bad_stream)?;
            let Some(event) = event else {
                src.consume(used);
                continue;
            };
            // The first change, or the end: the metadata is all there.
            let metadata_done = matches!(
                event,
                DiffEvent::Data { .. } | DiffEvent::Zero { .. } | DiffEvent::End
            );
            match &event {
                DiffEvent::FromSnapshot(name) => report.from = Some(name.clone()),
                DiffEvent::ToSnapshot(name) => report.to = Some(name.clone()),
                DiffEvent::Size(size) => {
                    report.size = *size;
                    sized = true;
                }
                _ => {}
            }
            if metadata_done && guard == Guard::None {
                if !sized {
                    return Err(VolumeError::InvalidArgument(
                        "bad diff stream: it gives no image size".into(),
                    ));
                }
                check_fit(vol, &report).await?;
                // Until it answers, the guard may or may not be there.
                guard = Guard::Asked;
                vol.core().begin_import().await?;
                guard = Guard::Taken;
                if report.size > vol.size() {
                    vol.resize(report.size).await?;
                }
            }
            let ended = event == DiffEvent::End;
            apply(vol, &mut pending, event, &mut report).await?;
            // The event borrowed the pending bytes until now.
            src.consume(used);
            if ended && !whole {
                break;
            }
        }
        pending.write(vol).await?;
        vol.flush().await?;
        vol.core().end_import(Some(report.to.as_deref())).await
    }
    .await;
    let Err(e) = applied else {
        return Ok(report);
    };
    let rollback = match guard {
        Guard::None => false,
        Guard::Asked => !matches!(e, VolumeError::Busy(_)) && has_guard(vol),
        Guard::Taken => has_guard(vol),
    };
    if rollback {
        if let Err(undo) = vol.core().end_import(None).await {
            tracing::error!(error = %undo, "could not roll back a failed import; the next writable open will");
        }
    }
    Err(e)
}

/// How far an import got with its guard.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Guard {
    None,
    /// Asked for: a lost answer may have taken it, or another import
    /// (Busy) holds it.
    Asked,
    Taken,
}

fn has_guard(vol: &Volume) -> bool {
    vol.snapshots().iter().any(|s| s.name == IMPORT_GUARD)
}

fn bad_stream(e: hlfs_format::rbd_diff::DiffStreamError) -> VolumeError {
    VolumeError::InvalidArgument(format!("bad diff stream: {e}"))
}

/// Checks that the stream fits the volume, before anything changes: its
/// from-snapshot is there and the head has not changed since (or, with no
/// from-snapshot, the volume holds no data), its to-snapshot is new and
/// valid, and its size is at least the volume's.
async fn check_fit(vol: &Volume, report: &DiffStreamReport) -> Result<()> {
    let snapshots = vol.snapshots();
    // First: a stream applied already is refused as such.
    if let Some(to) = &report.to {
        validate_snapshot_name(to)?;
        if snapshots.iter().any(|s| &s.name == to) {
            return Err(VolumeError::SnapshotExists(to.clone()));
        }
    }
    match &report.from {
        Some(from) => {
            if !snapshots.iter().any(|s| &s.name == from) {
                return Err(VolumeError::InvalidArgument(format!(
                    "{} has no snapshot {from:?}, which this diff starts from",
                    vol.location()
                )));
            }
            let changed = vol.changes_since(from).await?;
            // A head smaller than the snapshot lost its end: changed too.
            if !changed.extents.is_empty() || changed.from_size > changed.size {
                return Err(VolumeError::InvalidArgument(format!(
                    "the head of {} has changed since snapshot {from:?}, which this diff starts from: roll back to it first (hlfs snapshot rollback)",
                    vol.location()
                )));
            }
        }
        None => {
            if vol.extents(0, vol.size(), 1).await?.iter().any(|x| x.data) {
                return Err(VolumeError::InvalidArgument(format!(
                    "this diff starts from nothing, but {} holds data: apply it to a new volume",
                    vol.location()
                )));
            }
        }
    }
    if report.size < vol.size() {
        return Err(VolumeError::InvalidArgument(format!(
            "the diff's image is {} bytes, smaller than the volume's {}: volumes do not shrink",
            report.size,
            vol.size()
        )));
    }
    Ok(())
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
    event: DiffEvent<'_>,
    report: &mut DiffStreamReport,
) -> Result<()> {
    match event {
        DiffEvent::Data { offset, bytes } => {
            report.data_bytes += bytes.len() as u64;
            let follows = pending.offset + pending.bytes.len() as u64 == offset;
            if !follows || pending.bytes.len() as u64 >= CHUNK {
                pending.write(vol).await?;
                pending.offset = offset;
            }
            pending.bytes.extend_from_slice(bytes);
        }
        DiffEvent::Zero { offset, len } => {
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

    /// A volume exported as an RBD image (format 2: a diff per snapshot,
    /// then the head's) imports as a volume with the same snapshots and
    /// head. An image cut off in a later diff keeps the diffs before it,
    /// and says which; bytes after the last diff are refused.
    #[tokio::test]
    async fn a_volume_moves_whole_as_an_rbd_image() {
        let env = MemEnv::new();
        let (src, a) = volume(&env, 4 * MIB).await;
        a.write(0, &vec![0x11; 3 * MIB as usize]).await.unwrap();
        a.snapshot_create("s1").await.unwrap();
        a.write(12345, &[0x22; 7000]).await.unwrap();
        a.trim(MIB, 256 << 10).await.unwrap();
        a.resize(6 * MIB).await.unwrap();
        a.snapshot_create("s2").await.unwrap();
        a.write_zeroes(512, 5000).await.unwrap();
        a.write(5 * MIB, &[0x33; 4096]).await.unwrap();
        let mut stream = Vec::new();
        let r = export_image(&a, &OpenOptions::default(), &mut stream, &|_, _| {})
            .await
            .unwrap();
        assert_eq!((r.to.as_deref(), r.size), (Some("s2"), 6 * MIB));
        assert!(stream.starts_with(IMAGE_BANNER));
        let head = image(&a).await;
        a.close().await.unwrap();

        let (_, b) = volume(&MemEnv::new(), 4 * MIB).await;
        let r = import_diff(&b, &stream[..], &|_| {}).await.unwrap();
        assert_eq!((r.to.as_deref(), r.size), (Some("s2"), 6 * MIB));
        assert_eq!(names(&b), ["s1", "s2"]);
        assert_eq!(image(&b).await, head);
        let b_backend = b.core().backend.clone();
        b.close().await.unwrap();
        for s in ["s1", "s2"] {
            assert_eq!(
                snapshot_image(&b_backend, s).await,
                snapshot_image(&src, s).await,
                "{s}"
            );
        }

        // Cut inside the last diff (the head's): s1 and s2 stay.
        let (_, c) = volume(&MemEnv::new(), 4 * MIB).await;
        let err = import_diff(&c, &stream[..stream.len() - 100], &|_| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains("diff 3 of the image's 3"), "{err}");
        assert!(err.to_string().contains("s1, s2"), "{err}");
        assert_eq!(names(&c), ["s1", "s2"]);
        // Trailing bytes.
        let (_, d) = volume(&MemEnv::new(), 4 * MIB).await;
        let mut trailing = stream.clone();
        trailing.push(0);
        let err = import_diff(&d, &trailing[..], &|_| {}).await.unwrap_err();
        assert!(err.to_string().contains("after its last diff"), "{err}");
        // Into a volume that holds data: refused at the first diff.
        let (_, e) = volume(&MemEnv::new(), 4 * MIB).await;
        e.write(0, &[1; 4096]).await.unwrap();
        let err = import_diff(&e, &stream[..], &|_| {}).await.unwrap_err();
        assert!(err.to_string().contains("holds data"), "{err}");
        assert!(names(&e).is_empty());
    }

    #[tokio::test]
    async fn a_bad_stream_leaves_the_volume_as_it_was() {
        let (src, b, incremental) = source_and_replica().await;
        let check = |what: String, err: VolumeError, b: &Volume| {
            assert_eq!(b.size(), 4 * MIB, "{what}: {err}");
            assert_eq!(names(b), ["s1"], "{what}: {err}");
        };
        // A head that moved on since s1, and a volume with data for a
        // stream from nothing: refused before anything changes.
        let s1 = image(&b).await;
        b.write(0, &[0x44; 4096]).await.unwrap();
        let err = import_diff(&b, &incremental[..], &|_| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains("has changed since"), "{err}");
        let full = export(&src, "s2", None).await;
        let err = import_diff(&b, &full[..], &|_| {}).await.unwrap_err();
        assert!(err.to_string().contains("holds data"), "{err}");
        let auto = b.rollback("s1").await.unwrap();
        b.snapshot_delete(&auto).await.unwrap();
        let before = image(&b).await;
        assert_eq!(before, s1);
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
        // A to-snapshot name RBD allows and HLFS does not; a size past
        // what a volume can be, refused by the grow after the guard was
        // taken, which is rolled back.
        for (to, size) in [("with space", 4 * MIB), ("s9", 1 << 63)] {
            let mut other = hlfs_format::rbd_diff::BANNER.to_vec();
            other.extend(DiffRecord::FromSnapshot("s1".into()).encode());
            other.extend(DiffRecord::ToSnapshot(to.into()).encode());
            other.extend(DiffRecord::Size(size).encode());
            other.extend(DiffRecord::End.encode());
            let err = import_diff(&b, &other[..], &|_| {}).await.unwrap_err();
            check(format!("to {to:?}, size {size}"), err, &b);
            assert_eq!(image(&b).await, before);
        }
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
        vol.core().begin_import().await.unwrap();
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
