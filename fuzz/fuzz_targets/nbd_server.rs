//! A whole server connection fed arbitrary client bytes (handshake,
//! options, requests): it must end, without panicking or hanging, once the
//! client stops.
#![no_main]
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hlfs_nbd::{BlockDevice, ChangedRun, DeviceExtent, DeviceResult, Export, Limits, Server};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A 1 MiB device of zeros that accepts and forgets writes; its one change
/// set, `s`, says all of it changed.
struct Zeros;

#[async_trait]
impl BlockDevice for Zeros {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn block_size(&self) -> u32 {
        4096
    }
    async fn read(&self, _: u64, buf: &mut [u8]) -> DeviceResult<()> {
        buf.fill(0);
        Ok(())
    }
    async fn write(&self, _: u64, _: &[u8], _: bool) -> DeviceResult<()> {
        Ok(())
    }
    async fn flush(&self) -> DeviceResult<()> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u64) -> DeviceResult<()> {
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> DeviceResult<()> {
        Ok(())
    }
    async fn extents(&self, _: u64, len: u64) -> DeviceResult<Vec<DeviceExtent>> {
        Ok(vec![DeviceExtent { len, allocated: false }])
    }
    fn change_sets(&self) -> Vec<String> {
        vec!["s".to_string()]
    }
    async fn changes(&self, _: &str, _: u64, len: u64) -> DeviceResult<Vec<ChangedRun>> {
        Ok(vec![ChangedRun { len, changed: true }])
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let server = Server::new(
            vec![Export { name: "d".into(), description: String::new(), device: Arc::new(Zeros) }],
            None,
            // Limits small enough to be reached by a short input.
            Limits {
                max_connections_per_export: 1,
                handshake_timeout: Duration::from_secs(2),
                connection_bytes: 33 << 20,
                total_bytes: 1 << 20,
                ..Limits::default()
            },
            stop_rx,
        );
        let (client, server_side) = tokio::io::duplex(64 * 1024);
        let conn = tokio::spawn(server.connection(server_side, "fuzz".into()));
        // Write the input, then hang up, while draining what the server says.
        let input = data.to_vec();
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        });
        let mut sink = vec![0u8; 64 * 1024];
        let drain = async { while let Ok(n) = rd.read(&mut sink).await { if n == 0 { break; } } };
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(drain, conn, writer)
        })
        .await
        .expect("the connection must end once the client has gone");
    });
});
