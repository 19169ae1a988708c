//! `hlfs bench`: engine benchmarks on the local backend.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> Result<()> {
    anyhow::bail!("the engine benchmark is being written")
}
