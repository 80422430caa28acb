//! An SMTP relay in front of smtp-sink that injects faults into chosen mail transactions: a
//! soft refusal at `DATA` (the server never sees the mail), or a connection dropped after the
//! mail's final dot (the server has the mail, the client never hears so). The second is the
//! case a sender cannot tell from a lost mail: lifecycle must record it as unsure and may send
//! it again, and the sink then shows the duplicate.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// What the relay does to one mail transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Relay it.
    None,
    /// Answer `421` to `DATA` and hang up.
    SoftRejectData,
    /// Relay the mail, let the server accept it, then hang up before the client hears.
    DropAfterDot,
    /// Hang up halfway through the mail: the server never gets it (and the client cannot
    /// tell this from `DropAfterDot`).
    DropMidData,
}

/// The running relay.
pub struct SmtpRelay {
    /// Its port.
    pub port: u16,
    /// Faults injected so far, by kind: (soft rejects, drops after the dot, drops mid-data).
    injected: Arc<(AtomicUsize, AtomicUsize, AtomicUsize)>,
}

impl SmtpRelay {
    /// Relays to `127.0.0.1:upstream`; `plan(n)` decides the fault of the n-th `DATA` (from 0).
    pub async fn start(upstream: u16, plan: fn(usize) -> Fault) -> SmtpRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mails = Arc::new(AtomicUsize::new(0));
        let injected = Arc::new((
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        ));
        let counts = injected.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (mails, counts) = (mails.clone(), counts.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        relay(client, server, &mails, &counts, plan).await.ok();
                    }
                });
            }
        });
        SmtpRelay { port, injected }
    }

    /// `smtp://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// (soft rejects, drops after the dot, drops mid-data) injected so far.
    pub fn injected(&self) -> (usize, usize, usize) {
        (
            self.injected.0.load(Ordering::Relaxed),
            self.injected.1.load(Ordering::Relaxed),
            self.injected.2.load(Ordering::Relaxed),
        )
    }
}

/// Copies one reply (all its lines, `250-…` until `250 …`) from the server to the client.
async fn reply(
    server: &mut BufReader<OwnedReadHalf>,
    client: &mut OwnedWriteHalf,
) -> std::io::Result<Vec<u8>> {
    let mut all = Vec::new();
    loop {
        let mut line = Vec::new();
        if server.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        all.extend_from_slice(&line);
        if line.get(3) != Some(&b'-') {
            break;
        }
    }
    client.write_all(&all).await?;
    Ok(all)
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    mails: &AtomicUsize,
    counts: &(AtomicUsize, AtomicUsize, AtomicUsize),
    plan: fn(usize) -> Fault,
) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, mut client_write) = client.into_split();
    let (server_read, mut server_write) = server.into_split();
    let mut from_client = BufReader::new(client_read);
    let mut from_server = BufReader::new(server_read);
    reply(&mut from_server, &mut client_write).await?; // greeting
    loop {
        let mut line = Vec::new();
        if from_client.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        if !line.to_ascii_uppercase().starts_with(b"DATA") {
            server_write.write_all(&line).await?;
            reply(&mut from_server, &mut client_write).await?;
            continue;
        }
        let fault = plan(mails.fetch_add(1, Ordering::Relaxed));
        if fault == Fault::SoftRejectData {
            counts.0.fetch_add(1, Ordering::Relaxed);
            client_write
                .write_all(b"421 4.3.2 Service not available, try again later\r\n")
                .await?;
            return Ok(());
        }
        server_write.write_all(&line).await?;
        reply(&mut from_server, &mut client_write).await?; // 354
        let mut lines = 0;
        loop {
            let mut data = Vec::new();
            if from_client.read_until(b'\n', &mut data).await? == 0 {
                return Ok(());
            }
            if fault == Fault::DropMidData && lines == 10 {
                // The server has half a mail, which it discards when the connection goes.
                counts.2.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            lines += 1;
            server_write.write_all(&data).await?;
            if data == b".\r\n" {
                break;
            }
        }
        if fault == Fault::DropAfterDot {
            // Wait for the server's verdict (it has the mail), then hang up without a word.
            let mut verdict = Vec::new();
            from_server.read_until(b'\n', &mut verdict).await?;
            counts.1.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        reply(&mut from_server, &mut client_write).await?;
    }
}
