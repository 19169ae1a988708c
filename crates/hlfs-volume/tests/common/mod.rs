//! A plain model of a disk for the engine's tests: sparse 512-byte sectors.
#![allow(dead_code)]

use std::collections::BTreeMap;

pub const SECTOR: u64 = 512;

#[derive(Clone, Debug)]
pub struct Image {
    pub size: u64,
    sectors: BTreeMap<u64, Box<[u8; SECTOR as usize]>>,
}

impl Image {
    pub fn new(size: u64) -> Self {
        Image {
            size,
            sectors: BTreeMap::new(),
        }
    }

    pub fn write(&mut self, off: u64, data: &[u8]) {
        assert!(off + data.len() as u64 <= self.size);
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let sector = pos / SECTOR;
            let within = (pos % SECTOR) as usize;
            let n = (SECTOR as usize - within).min(data.len() - done);
            let s = self
                .sectors
                .entry(sector)
                .or_insert_with(|| Box::new([0; SECTOR as usize]));
            s[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    /// Zeroes a range. Its sectors are listed (as zeros) so that later
    /// checks read them back, and partial blocks the engine stores as
    /// zero-filled data count as touched.
    pub fn zero(&mut self, off: u64, len: u64) {
        self.write(off, &vec![0u8; len as usize]);
    }

    pub fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        let end = off + len;
        for (&sector, s) in self.sectors.range(off / SECTOR..end.div_ceil(SECTOR)) {
            let lo = (sector * SECTOR).max(off);
            let hi = ((sector + 1) * SECTOR).min(end);
            out[(lo - off) as usize..(hi - off) as usize].copy_from_slice(
                &s[(lo - sector * SECTOR) as usize..(hi - sector * SECTOR) as usize],
            );
        }
        out
    }

    /// Blocks of `bs` bytes holding any sector that was ever written.
    pub fn touched_blocks(&self, bs: u64) -> u64 {
        let mut blocks: Vec<u64> = self.sectors.keys().map(|s| s * SECTOR / bs).collect();
        blocks.dedup();
        blocks.len() as u64
    }
}

/// Byte ranges (within `size`) covering every sector any image touched.
pub fn touched_ranges<'a>(images: impl Iterator<Item = &'a Image>, size: u64) -> Vec<(u64, u64)> {
    let mut sectors: Vec<u64> = images.flat_map(|i| i.sectors.keys().copied()).collect();
    sectors.sort_unstable();
    sectors.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in sectors {
        let lo = s * SECTOR;
        if lo >= size {
            break;
        }
        let hi = ((s + 1) * SECTOR).min(size);
        match out.last_mut() {
            Some((o, l)) if *o + *l == lo && *l < (1 << 20) => *l += hi - lo,
            _ => out.push((lo, hi - lo)),
        }
    }
    out
}

/// Deterministic, mostly nonzero bytes that differ per seed.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2654435761) >> 7) as u8 ^ seed.wrapping_mul(37) | 1)
        .collect()
}

/// The ranges write-zeroes applies, in the engine's record order: partial
/// head block, partial tail block, then the whole blocks between.
pub fn zero_steps(off: u64, len: u64, bs: u64, size: u64) -> Vec<(u64, u64)> {
    if len == 0 {
        return Vec::new();
    }
    let end = off + len;
    let full_end = if end == size {
        end.div_ceil(bs)
    } else {
        end / bs
    };
    let full_start = off.div_ceil(bs);
    let mut steps = Vec::new();
    if full_start < full_end {
        let head_end = (full_start * bs).min(end);
        if off < head_end {
            steps.push((off, head_end - off));
        }
        let tail_start = full_end * bs;
        if tail_start < end {
            steps.push((tail_start, end - tail_start));
        }
        let lo = full_start * bs;
        steps.push((lo, (full_end * bs).min(size) - lo));
    } else {
        let mut block = off / bs;
        while block * bs < end {
            let lo = (block * bs).max(off);
            let hi = ((block + 1) * bs).min(end);
            steps.push((lo, hi - lo));
            block += 1;
        }
    }
    steps
}

/// Cases per property: `PROPTEST_CASES` if set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A memory store and journal behind a fault layer: what the engine's
/// tests run on.
pub struct World {
    pub env: hlfs_store::MemEnv,
    pub faults: hlfs_store::layers::Faults,
}

impl World {
    pub fn new() -> World {
        World::over(hlfs_store::MemEnv::new())
    }

    pub fn over(env: hlfs_store::MemEnv) -> World {
        World {
            env,
            faults: hlfs_store::layers::Faults::new(),
        }
    }

    /// A backend on this world, through its fault layer.
    pub fn backend(&self) -> hlfs_volume::Backend {
        hlfs_volume::Backend::memory(&self.env).with_faults(&self.faults)
    }

    /// The same, treated as a remote store: a longer upload backlog and
    /// parallel uploads.
    pub fn remote(&self) -> hlfs_volume::Backend {
        hlfs_volume::Backend {
            remote: true,
            ..self.backend()
        }
    }

    /// What a power cut now would leave, as a new world.
    pub async fn power_cut(&self, mode: hlfs_store::layers::CrashMode) -> World {
        World::over(self.faults.power_cut(mode).await.expect("power-cut image"))
    }

    /// What another host sees: the blobs, no journal.
    pub fn store_only(&self) -> World {
        World::over(self.env.store_only())
    }
}
