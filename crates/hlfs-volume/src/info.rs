//! What a volume says about itself (`hlfs info`), and how it writes times.

use crate::core::Core;
use crate::error::Result;
use crate::options::{SnapshotInfo, VolumeInfo};

/// A time (ms since the epoch) as `YYYY-MM-DD hh:mm:ss UTC`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl Core {
    pub(crate) fn allocated_bytes(&self) -> u64 {
        self.map.lock().usage().allocated_blocks() * self.block_size as u64
    }

    /// Summary for `hlfs info`.
    pub(crate) async fn info(&self) -> Result<VolumeInfo> {
        let mut stored = 0;
        for prefix in ["segments/", "manifest/"] {
            stored += self
                .store
                .list(prefix)
                .await?
                .iter()
                .map(|b| b.size)
                .sum::<u64>();
        }
        let journal = &self.backend.journal;
        for name in journal.list()? {
            if let Ok(f) = journal.open(&name) {
                stored += f.len().unwrap_or(0);
            }
        }
        let m = self.manifests.get();
        let clones = self.clones().await?;
        let snapshots = m
            .snapshots
            .iter()
            .filter(|s| !crate::retain::is_point(&s.name))
            .map(|s| SnapshotInfo {
                clones: clones
                    .iter()
                    .filter(|(name, lsn, _)| *name == s.name && *lsn == s.lsn)
                    .map(|(_, _, address)| address.clone())
                    .collect(),
                ..SnapshotInfo::from(s)
            })
            .collect();
        Ok(VolumeInfo {
            uuid: uuid::Uuid::from_bytes(self.uuid).to_string(),
            size: self.size(),
            block_size: self.block_size,
            segment_size: self.segment_size,
            allocated_bytes: self.allocated_bytes(),
            stored_bytes: stored,
            format_version: m.version,
            snapshots,
            parent: m.parent.as_ref().map(crate::ParentInfo::from),
            retention: crate::retain::info(&m),
            writer: m.writer.map(|w| format!("process {} on {}", w.pid, w.host)),
            created_ms: m.volume_created_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(
            utc(1_795_219_200_000 + 3_723_000),
            "2026-11-21 01:02:03 UTC"
        );
    }
}
