//! The `smtp` provider: a pool of SMTP connections made with TCP_NODELAY.
//!
//! lettre 0.11's own pool never sets TCP_NODELAY, and Nagle's algorithm then holds each small
//! SMTP command for the peer's delayed ACK: about 40 ms a message. So the socket is made here,
//! with nodelay, and handed to lettre (`connect_with_transport`); the pool is a stack of idle
//! connections bounded by a semaphore.

use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};

use super::{Accepted, Content, Failure, Outgoing};
use crate::config::{Settings, SmtpTls, SmtpUrl};

/// An SMTP relay with pooled connections.
pub struct SmtpProvider {
    url: SmtpUrl,
    from: lettre::Address,
    hello: ClientId,
    connect_timeout: Duration,
    nodelay: bool,
    idle: Mutex<Vec<AsyncSmtpConnection>>,
    slots: Semaphore,
}

impl SmtpProvider {
    /// A provider for the relay of the settings; connects on first use.
    pub fn new(settings: &Settings) -> SmtpProvider {
        SmtpProvider {
            url: settings.smtp_url.clone(),
            from: settings.from.email.clone(),
            hello: ClientId::default(),
            connect_timeout: Duration::from_secs(10),
            nodelay: settings.dispatch.smtp_nodelay,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(settings.dispatch.smtp_pool_size),
        }
    }

    pub(super) async fn send(&self, message: &Outgoing) -> Result<Accepted, Failure> {
        let Content::Email { .. } = &message.content else {
            return Err(Failure::permanent("the smtp provider sends email only"));
        };
        let mime = message.mime()?;
        let to: lettre::Address = message
            .to
            .parse()
            .map_err(|e| Failure::permanent(format!("bad recipient: {e}")))?;
        let envelope = Envelope::new(Some(self.from.clone()), vec![to])
            .map_err(|e| Failure::permanent(e.to_string()))?;
        let _slot = self.slots.acquire().await.expect("semaphore never closed");

        // A pooled connection may have been closed by the server while idle; then the send
        // fails before the server saw the message, and one fresh connection is tried. Never
        // once the mail data went out: the server may have taken it.
        let pooled = self.idle.lock().await.pop();
        let reused = pooled.is_some();
        let mut connection = match pooled {
            Some(c) => c,
            None => self.connect().await?,
        };
        let mut result = transact(&mut connection, &envelope, &mime).await;
        if reused
            && matches!(&result, Err((stage, e)) if *stage != Stage::Message && e.status().is_none())
        {
            connection.abort().await;
            connection = self.connect().await?;
            result = transact(&mut connection, &envelope, &mime).await;
        }
        match result {
            Ok(response) => {
                self.idle.lock().await.push(connection);
                Ok(Accepted {
                    reference: response.message().collect::<Vec<_>>().join(" "),
                })
            }
            Err((stage, error)) => {
                if connection.has_broken() {
                    connection.abort().await;
                } else {
                    // The server answered (e.g. a 4xx or 5xx to RCPT); the session is reusable
                    // after a reset.
                    match connection
                        .command(lettre::transport::smtp::commands::Rset)
                        .await
                    {
                        Ok(_) => self.idle.lock().await.push(connection),
                        Err(_) => connection.abort().await,
                    }
                }
                if stage == Stage::Rcpt && error.is_permanent() {
                    return Err(Failure::recipient_rejected(format!(
                        "smtp: recipient refused: {error}"
                    )));
                }
                if stage == Stage::Message && error.status().is_none() {
                    // The data went out and no verdict came back (the connection dropped, timed
                    // out, or left a reply incomplete): the server may have queued the mail.
                    return Err(Failure::unsure(format!(
                        "smtp: no answer after the mail data: {error}"
                    )));
                }
                Err(classify(&error))
            }
        }
    }

    /// Opens a connection: TCP with nodelay, then STARTTLS and AUTH as the URL asks.
    async fn connect(&self) -> Result<AsyncSmtpConnection, Failure> {
        let address = (self.url.host.as_str(), self.url.port);
        let unavailable = |e: &dyn std::fmt::Display| {
            Failure::transient(
                None,
                format!("connecting to {}:{}: {e}", self.url.host, self.url.port),
            )
        };
        let mut connection = if self.url.tls == SmtpTls::Wrapper {
            // Implicit TLS goes through lettre's own connect, which cannot set nodelay.
            let tls = TlsParameters::new(self.url.host.clone()).map_err(|e| unavailable(&e))?;
            tokio::time::timeout(
                self.connect_timeout,
                AsyncSmtpConnection::connect_tokio1(
                    address,
                    Some(self.connect_timeout),
                    &self.hello,
                    Some(tls),
                    None,
                ),
            )
            .await
            .map_err(|_| unavailable(&"timed out"))?
            .map_err(|e| unavailable(&e))?
        } else {
            let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
                .await
                .map_err(|_| unavailable(&"timed out"))?
                .map_err(|e| unavailable(&e))?;
            stream
                .set_nodelay(self.nodelay)
                .map_err(|e| unavailable(&e))?;
            AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello)
                .await
                .map_err(|e| classify(&e))?
        };
        let wants_tls = matches!(self.url.tls, SmtpTls::Required | SmtpTls::Opportunistic);
        if wants_tls && connection.can_starttls() {
            let tls = TlsParameters::new(self.url.host.clone()).map_err(|e| unavailable(&e))?;
            connection
                .starttls(tls, &self.hello)
                .await
                .map_err(|e| classify(&e))?;
        } else if self.url.tls == SmtpTls::Required {
            return Err(Failure::transient(
                None,
                "the SMTP server does not offer STARTTLS, which tls=required demands",
            ));
        }
        if let Some((user, password)) = &self.url.credentials {
            let credentials = Credentials::new(user.clone(), password.expose().to_owned());
            connection
                .auth(&[Mechanism::Plain, Mechanism::Login], &credentials)
                .await
                .map_err(|e| classify(&e))?;
        }
        Ok(connection)
    }
}

/// Where in a mail transaction a command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Mail,
    Rcpt,
    /// The `DATA` command, before any of the mail went out.
    Data,
    /// The mail itself and its final dot: from here the server may have the message.
    Message,
}

/// One mail transaction, command by command (as lettre's `send` does), so that a refusal of
/// the recipient (a 5xx to RCPT, which suppresses the address) is told apart from others.
async fn transact(
    connection: &mut AsyncSmtpConnection,
    envelope: &Envelope,
    mime: &[u8],
) -> Result<lettre::transport::smtp::response::Response, (Stage, lettre::transport::smtp::Error)> {
    use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
    use lettre::transport::smtp::extension::{MailBodyParameter, MailParameter};
    let mut options = Vec::new();
    if !mime.is_ascii() {
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    connection
        .command(Mail::new(envelope.from().cloned(), options))
        .await
        .map_err(|e| (Stage::Mail, e))?;
    for to in envelope.to() {
        connection
            .command(Rcpt::new(to.clone(), Vec::new()))
            .await
            .map_err(|e| (Stage::Rcpt, e))?;
    }
    connection
        .command(Data)
        .await
        .map_err(|e| (Stage::Data, e))?;
    connection
        .message(mime)
        .await
        .map_err(|e| (Stage::Message, e))
}

/// SMTP 5xx is permanent; 4xx, timeouts and connection trouble are transient.
fn classify(error: &lettre::transport::smtp::Error) -> Failure {
    let message = format!("smtp: {error}");
    if error.is_permanent() {
        Failure::permanent(message)
    } else {
        Failure::transient(None, message)
    }
}
