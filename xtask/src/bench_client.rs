//! `xtask bench-client`: the load generator of `cargo xtask bench tcp`.
//!
//! It always runs as its own process, for every path, so that the three paths differ only in
//! where the connections go: for the gate path `agentgate exec` places it in the governed
//! cgroup (the eBPF hook sees a connect from a governed process and redirects it), for the
//! direct and nginx paths it is started plainly. Plain std threads and blocking sockets: the
//! least client overhead there is, and the same overhead on every path.
//!
//! Each run prints one JSON object on stdout (and nothing else): what it measured, how many
//! connections it opened (the bench checks that the gate served exactly that many) and the
//! cgroup it ran in (the bench checks that only gate runs were governed).
//!
//! Wire protocol of the bench's bulk server (`bench::tcp`): the client sends a 9-byte header,
//! a mode byte and a little-endian u64 length. Upload (`U`): the client then sends that many
//! bytes, the server discards them and answers with the u64 count it received. Download (`D`):
//! the server sends that many bytes. The echo server just echoes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};

/// Header mode byte: client sends, server discards and acknowledges the count.
pub const MODE_UPLOAD: u8 = b'U';
/// Header mode byte: server sends.
pub const MODE_DOWNLOAD: u8 = b'D';
/// Mode byte + u64 little-endian length.
pub const HEADER_LEN: usize = 9;
/// Read/write size of bulk transfers, both sides.
pub const CHUNK: usize = 256 * 1024;

/// Fails a stuck transfer instead of hanging the bench.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(
    name = "xtask bench-client",
    about = "load generator of `cargo xtask bench tcp`"
)]
struct ClientArgs {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Loops of connect, write a small request, read its echo, close; prints every sample.
    Latency {
        #[arg(long)]
        addr: SocketAddr,
        /// Timed connects, in total over all loops.
        #[arg(long)]
        iterations: usize,
        /// Untimed connects per loop before the timed ones.
        #[arg(long, default_value_t = 100)]
        warmup: usize,
        /// Concurrent loops.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Request (and echo) size in bytes.
        #[arg(long, default_value_t = 64)]
        payload: usize,
    },
    /// `conns` connections each send `bytes` to the bulk server, which discards them.
    Upload {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        bytes: u64,
    },
    /// `conns` connections each receive `bytes` from the bulk server.
    Download {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        bytes: u64,
    },
}

/// Entry point of `xtask bench-client ARGS...` (`args` without the subcommand name).
pub fn main(args: &[String]) -> Result<()> {
    let parsed = ClientArgs::try_parse_from(
        std::iter::once("xtask bench-client".to_string()).chain(args.iter().cloned()),
    )
    .unwrap_or_else(|e| e.exit());
    let mut out = match parsed.mode {
        Mode::Latency {
            addr,
            iterations,
            warmup,
            parallel,
            payload,
        } => latency(addr, iterations, warmup, parallel, payload)?,
        Mode::Upload { addr, conns, bytes } => bulk(addr, conns, bytes, MODE_UPLOAD)?,
        Mode::Download { addr, conns, bytes } => bulk(addr, conns, bytes, MODE_DOWNLOAD)?,
    };
    if let Some(o) = out.as_object_mut() {
        o.insert("cgroup".into(), own_cgroup().into());
        o.insert("pid".into(), std::process::id().into());
    }
    println!("{out}");
    Ok(())
}

/// This process's cgroup v2 path ("0::/path" in /proc/self/cgroup).
pub fn own_cgroup() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .to_string()
}

pub fn header(mode: u8, len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let (m, rest) = h.split_at_mut(1);
    m.fill(mode);
    rest.copy_from_slice(&len.to_le_bytes());
    h
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn latency(
    addr: SocketAddr,
    iterations: usize,
    warmup: usize,
    parallel: usize,
    payload: usize,
) -> Result<serde_json::Value> {
    ensure!(parallel >= 1, "--parallel must be at least 1");
    ensure!(payload >= 1, "--payload must be at least 1");
    let per_loop = iterations.div_ceil(parallel);
    let started = Instant::now();
    let results: Vec<Result<Vec<u64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..parallel)
            .map(|_| s.spawn(move || latency_loop(addr, warmup, per_loop, payload)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("latency thread panicked")))
            })
            .collect()
    });
    let wall = started.elapsed();
    let mut samples = Vec::with_capacity(per_loop * parallel);
    for r in results {
        samples.extend(r?);
    }
    Ok(serde_json::json!({
        "mode": "latency",
        "parallel": parallel,
        "connections": (warmup + per_loop) * parallel,
        "wall_s": wall.as_secs_f64(),
        "samples_ns": samples,
    }))
}

/// One loop: every sample is connect + write request + read the whole echo, close not timed.
fn latency_loop(addr: SocketAddr, warmup: usize, n: usize, payload: usize) -> Result<Vec<u64>> {
    let request: Vec<u8> = (0..payload).map(|i| b'a' + (i % 26) as u8).collect();
    let mut echo = vec![0u8; payload];
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let t0 = Instant::now();
        let mut s = TcpStream::connect(addr)
            .with_context(|| format!("connect to {addr} (connection {i} of this loop)"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.write_all(&request)
            .with_context(|| format!("write request to {addr}"))?;
        s.read_exact(&mut echo)
            .with_context(|| format!("read echo from {addr}"))?;
        let elapsed = t0.elapsed();
        drop(s);
        ensure!(echo == request, "echo from {addr} differs from the request");
        if i >= warmup {
            samples.push(nanos(elapsed));
        }
    }
    Ok(samples)
}

fn bulk(addr: SocketAddr, conns: usize, bytes: u64, mode: u8) -> Result<serde_json::Value> {
    ensure!(conns >= 1, "--conns must be at least 1");
    // Timing starts once every connection is established and has sent its header.
    let barrier = Barrier::new(conns + 1);
    let (start, results) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|_| {
                let barrier = &barrier;
                s.spawn(move || bulk_one(addr, bytes, mode, barrier))
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let results: Vec<Result<Instant>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("transfer thread panicked")))
            })
            .collect();
        (start, results)
    });
    let mut end = start;
    for r in results {
        end = end.max(r?);
    }
    let seconds = end.duration_since(start).as_secs_f64();
    let total = bytes.saturating_mul(conns as u64);
    Ok(serde_json::json!({
        "mode": if mode == MODE_UPLOAD { "upload" } else { "download" },
        "connections": conns,
        "bytes": total,
        "seconds": seconds,
        "mib_per_s": total as f64 / (1024.0 * 1024.0) / seconds.max(1e-9),
    }))
}

/// Connects and sends the header, meets the others at the barrier (always, even on error, so
/// nobody waits forever), then transfers. Returns when its last byte arrived.
fn bulk_one(addr: SocketAddr, bytes: u64, mode: u8, barrier: &Barrier) -> Result<Instant> {
    let setup = (|| -> Result<TcpStream> {
        let mut s = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.write_all(&header(mode, bytes))?;
        Ok(s)
    })();
    barrier.wait();
    let mut s = setup?;
    let mut buf = vec![0x5au8; CHUNK];
    let mut left = bytes;
    if mode == MODE_UPLOAD {
        while left > 0 {
            let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            let chunk = buf.get(..n).context("chunk size")?;
            s.write_all(chunk)
                .with_context(|| format!("upload to {addr}, {left} bytes left"))?;
            left -= n as u64;
        }
        let mut ack = [0u8; 8];
        s.read_exact(&mut ack)
            .with_context(|| format!("read upload acknowledgement from {addr}"))?;
        let end = Instant::now();
        let got = u64::from_le_bytes(ack);
        ensure!(
            got == bytes,
            "server received {got} bytes, {bytes} were sent"
        );
        Ok(end)
    } else {
        while left > 0 {
            let n = s
                .read(&mut buf)
                .with_context(|| format!("download from {addr}, {left} bytes left"))?;
            if n == 0 {
                bail!("download from {addr} ended with {left} of {bytes} bytes missing");
            }
            left = left.saturating_sub(n as u64);
        }
        Ok(Instant::now())
    }
}
