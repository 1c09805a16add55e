//! What tonic alone does on this machine in the shape `govflow bench --grpc`
//! uses it: a server and its clients in one process over loopback TCP,
//! `--clients` callers sharing `--connections` HTTP/2 connections, each
//! calling again as soon as it is answered. The call is the gRPC health
//! check, which does no work, so the figure is a ceiling for calls per
//! second (see BENCHMARKS.md).
//!
//!     cargo run --release --example grpc_floor -- [clients] [connections] [seconds]

// The allocator the `govflow` binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use tonic::transport::{Channel, Server, server::TcpIncoming};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let clients: usize = args.next().map_or(Ok(64), |a| a.parse())?;
    let connections: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    let seconds: u64 = args.next().map_or(Ok(10), |a| a.parse())?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(
        Server::builder()
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(
            Channel::from_shared(format!("http://{address}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    let end = Instant::now() + Duration::from_secs(seconds);
    let callers: Vec<_> = (0..clients)
        .map(|c| {
            let mut client = HealthClient::new(channels[c % channels.len()].clone());
            tokio::spawn(async move {
                let mut calls = 0u64;
                while Instant::now() < end {
                    if client.check(HealthCheckRequest::default()).await.is_err() {
                        break;
                    }
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let mut calls = 0;
    for caller in callers {
        calls += caller.await?;
    }
    println!(
        "tonic alone: {} calls/s with {clients} clients over {connections} connections",
        calls / seconds.max(1)
    );
    Ok(())
}
