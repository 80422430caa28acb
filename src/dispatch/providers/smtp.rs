//! The `smtp` provider: a pool of SMTP connections made with TCP_NODELAY.
//!
//! lettre 0.11's own pool never sets TCP_NODELAY, and Nagle's algorithm then holds each small
//! SMTP command for the peer's delayed ACK: about 40 ms a message. So the socket is made here,
//! with nodelay, and handed to lettre (`connect_with_transport`); the pool is a stack of idle
//! connections bounded by a semaphore.
//!
//! Where the server offers PIPELINING (RFC 2920), a mail transaction takes two round trips
//! instead of four: `MAIL`, `RCPT` and `DATA` go in one write and their replies are read in
//! order, then the mail data and its final dot go in one write.

use std::fmt::{self, Display, Write as _};
use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};

use super::{Accepted, Content, Failure, Outgoing, enhanced_status, mailbox_gone};
use crate::config::{Settings, SmtpTls, SmtpUrl};

/// An SMTP relay with pooled connections.
pub(crate) struct SmtpProvider {
    url: SmtpUrl,
    from: lettre::Address,
    hello: ClientId,
    connect_timeout: Duration,
    nodelay: bool,
    idle: Mutex<Vec<Connection>>,
    slots: Semaphore,
}

/// One SMTP session, and whether its server takes pipelined commands.
struct Connection {
    session: AsyncSmtpConnection,
    pipelining: bool,
}

impl SmtpProvider {
    /// A provider for the relay of the settings; connects on first use.
    pub(crate) fn new(settings: &Settings) -> SmtpProvider {
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
            connection.session.abort().await;
            connection = self.connect().await?;
            result = transact(&mut connection, &envelope, &mime).await;
        }
        match result {
            Ok(response) => {
                self.idle.lock().await.push(connection);
                Ok(Accepted::new(
                    &response.message().collect::<Vec<_>>().join(" "),
                ))
            }
            Err((stage, error)) => {
                if connection.session.has_broken() {
                    connection.session.abort().await;
                } else {
                    // The server answered (e.g. a 4xx or 5xx to RCPT); the session is reusable
                    // after a reset.
                    match connection.session.command(Rset).await {
                        Ok(_) => self.idle.lock().await.push(connection),
                        Err(_) => connection.session.abort().await,
                    }
                }
                if stage == Stage::Message && error.status().is_none() {
                    // The data went out and no verdict came back (the connection dropped, timed
                    // out, or left a reply incomplete): the server may have queued the mail.
                    return Err(Failure::unsure(format!(
                        "smtp: no answer after the mail data: {error}"
                    )));
                }
                Err(refusal(stage, &error))
            }
        }
    }

    /// Opens a connection: TCP with nodelay, then STARTTLS as the URL asks, a second EHLO to
    /// learn whether the server pipelines (lettre keeps only the extensions it uses), and AUTH.
    async fn connect(&self) -> Result<Connection, Failure> {
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
                .map_err(|e| refusal(Stage::Session, &e))?
        };
        let wants_tls = matches!(self.url.tls, SmtpTls::Required | SmtpTls::Opportunistic);
        if wants_tls && connection.can_starttls() {
            let tls = TlsParameters::new(self.url.host.clone()).map_err(|e| unavailable(&e))?;
            connection
                .starttls(tls, &self.hello)
                .await
                .map_err(|e| refusal(Stage::Session, &e))?;
        } else if self.url.tls == SmtpTls::Required {
            return Err(Failure::transient(
                None,
                "the SMTP server does not offer STARTTLS, which tls=required demands",
            ));
        }
        let extensions = connection
            .command(Ehlo::new(self.hello.clone()))
            .await
            .map_err(|e| refusal(Stage::Session, &e))?;
        let pipelining = offers_pipelining(&extensions);
        if let Some((user, password)) = &self.url.credentials {
            let credentials = Credentials::new(user.clone(), password.expose().to_owned());
            connection
                .auth(&[Mechanism::Plain, Mechanism::Login], &credentials)
                .await
                .map_err(|e| refusal(Stage::Session, &e))?;
        }
        Ok(Connection {
            session: connection,
            pipelining,
        })
    }
}

/// Where in a mail transaction a command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before any transaction: the greeting, EHLO, STARTTLS, AUTH.
    Session,
    Mail,
    Rcpt,
    /// The `DATA` command, before any of the mail went out.
    Data,
    /// The mail itself and its final dot: from here the server may have the message.
    Message,
}

/// Whether an EHLO reply lists PIPELINING (RFC 2920).
fn offers_pipelining(ehlo: &Response) -> bool {
    ehlo.message().skip(1).any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|keyword| keyword.eq_ignore_ascii_case("PIPELINING"))
    })
}

/// `MAIL`, each `RCPT` and `DATA`, written together (RFC 2920: `DATA` ends the group).
struct Pipelined<'a> {
    mail: &'a Mail,
    rcpts: &'a [Rcpt],
}

impl Display for Pipelined<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.mail)?;
        for rcpt in self.rcpts {
            write!(f, "{rcpt}")?;
        }
        write!(f, "{Data}")
    }
}

/// The mail data as it goes on the wire, in one write: the same bytes lettre's `message`
/// writes in two (a period that starts a line after CRLF is doubled, RFC 5321 4.5.2; then
/// CRLF, the final dot, CRLF).
struct MailData<'a>(&'a str);

impl Display for MailData<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        if rest.starts_with('.') {
            f.write_char('.')?;
        }
        while let Some(at) = rest.find("\r\n.") {
            f.write_str(&rest[..at + 3])?;
            f.write_char('.')?;
            rest = &rest[at + 3..];
        }
        f.write_str(rest)?;
        f.write_str("\r\n.\r\n")
    }
}

/// One mail transaction. Each command's failure is told apart (a refusal of the recipient, a
/// 5xx to RCPT, suppresses the address). Pipelined, every reply of the group is read whatever
/// was refused, so the session stays in step; a session that cannot be kept in step (a reply
/// lost, or `DATA` accepted after a refusal) is closed.
async fn transact(
    connection: &mut Connection,
    envelope: &Envelope,
    mime: &[u8],
) -> Result<Response, (Stage, lettre::transport::smtp::Error)> {
    let mut options = Vec::new();
    if !mime.is_ascii() {
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let mail = Mail::new(envelope.from().cloned(), options);
    let rcpts: Vec<Rcpt> = envelope
        .to()
        .iter()
        .map(|to| Rcpt::new(to.clone(), Vec::new()))
        .collect();
    let session = &mut connection.session;
    if connection.pipelining {
        let mut refused = None;
        let replies = std::iter::once(Stage::Mail)
            .chain(rcpts.iter().map(|_| Stage::Rcpt))
            .chain([Stage::Data]);
        for (n, stage) in replies.enumerate() {
            let reply = if n == 0 {
                session
                    .command(Pipelined {
                        mail: &mail,
                        rcpts: &rcpts,
                    })
                    .await
            } else {
                session.read_response().await
            };
            match reply {
                Err(error) if error.status().is_none() => {
                    // No reply, or one that did not parse: the session is out of step.
                    session.abort().await;
                    return Err(refused.unwrap_or((stage, error)));
                }
                Err(error) => {
                    refused.get_or_insert((stage, error));
                }
                Ok(_) if stage == Stage::Data && refused.is_some() => {
                    // The server waits for mail data no one will send.
                    session.abort().await;
                }
                Ok(_) => {}
            }
        }
        if let Some(refused) = refused {
            return Err(refused);
        }
    } else {
        session.command(mail).await.map_err(|e| (Stage::Mail, e))?;
        for rcpt in rcpts {
            session.command(rcpt).await.map_err(|e| (Stage::Rcpt, e))?;
        }
        session.command(Data).await.map_err(|e| (Stage::Data, e))?;
    }
    let sent = match std::str::from_utf8(mime) {
        Ok(text) => session.command(MailData(text)).await,
        Err(_) => session.message(mime).await,
    };
    sent.map_err(|e| (Stage::Message, e))
}

/// What an SMTP error means for the message, the address and the relay.
///
/// Only a mailbox-level permanent answer to `RCPT` says the address is bad: enhanced status
/// 5.1.x (bad mailbox, bad address, RFC 3463) or 5.2.1 (mailbox disabled). That address is
/// suppressed. A permanent refusal of the message itself after `DATA` (5.3.x, too big; 5.6.x,
/// its content) fails the message. Any other 5xx is the relay's refusal, not the member's:
/// policy and relaying (5.7.x, `554 5.7.1 Relay access denied`), authentication, syntax
/// (5.5.x), a sender refused, or a 5xx with no enhanced status at all. That is the provider
/// failing: it counts toward its circuit breaker, the next provider is tried, the message is
/// retried later, and nothing is suppressed (a relay misconfigured for a minute must not
/// silence every member it was tried on). 4xx, timeouts and connection trouble are transient.
fn refusal(stage: Stage, error: &lettre::transport::smtp::Error) -> Failure {
    let reply = std::error::Error::source(error).map(|text| text.to_string());
    verdict(
        stage,
        error.is_permanent(),
        reply.as_deref(),
        &error.to_string(),
    )
}

/// `refusal` from the error's parts: whether it is a 5xx, the reply's text (which starts
/// with the enhanced status, when the server gives one), and the error as lettre words it.
fn verdict(stage: Stage, permanent: bool, reply: Option<&str>, error: &str) -> Failure {
    let message = format!("smtp: {error}");
    if !permanent {
        return Failure::transient(None, message);
    }
    let status = reply.and_then(enhanced_status);
    match (stage, status) {
        (Stage::Rcpt, Some(status)) if mailbox_gone(status) => {
            Failure::recipient_rejected(format!("smtp: recipient refused: {error}"))
        }
        (Stage::Data | Stage::Message, Some((5, 3 | 6, _))) => Failure::permanent(message),
        _ => Failure::transient(
            None,
            format!("{message} (the relay refused; not the address)"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_mailbox_answer_to_rcpt_rejects_the_recipient() {
        // (stage, reply, outcome, suppresses the address)
        let table = [
            (
                Stage::Rcpt,
                "550 5.1.1 <m@example.com>: Recipient address rejected",
                "permanent",
                true,
            ),
            (
                Stage::Rcpt,
                "553 5.1.3 bad address syntax",
                "permanent",
                true,
            ),
            (Stage::Rcpt, "550 5.2.1 mailbox disabled", "permanent", true),
            (
                Stage::Rcpt,
                "554 5.7.1 <m@example.com>: Relay access denied",
                "transient",
                false,
            ),
            (
                Stage::Rcpt,
                "550 5.7.1 Client host rejected: access denied",
                "transient",
                false,
            ),
            (
                Stage::Rcpt,
                "550 Requested action not taken",
                "transient",
                false,
            ),
            (Stage::Rcpt, "501 5.5.4 syntax", "transient", false),
            (Stage::Rcpt, "452 4.2.2 over quota", "transient", false),
            (
                Stage::Mail,
                "550 5.1.8 sender domain unknown",
                "transient",
                false,
            ),
            (
                Stage::Session,
                "535 5.7.8 authentication failed",
                "transient",
                false,
            ),
            (
                Stage::Message,
                "552 5.3.4 message too big",
                "permanent",
                false,
            ),
            (
                Stage::Message,
                "554 5.6.0 content rejected",
                "permanent",
                false,
            ),
            (
                Stage::Message,
                "554 5.7.1 spam score too high",
                "transient",
                false,
            ),
        ];
        for (stage, reply, outcome, suppresses) in table {
            let (code, text) = reply.split_once(' ').unwrap();
            let failure = verdict(
                stage,
                code.starts_with('5'),
                Some(text),
                &format!("permanent error ({code}): {text}"),
            );
            assert_eq!(failure.outcome(), outcome, "{stage:?} {reply}");
            assert_eq!(failure.rejects_recipient(), suppresses, "{stage:?} {reply}");
            assert!(!failure.to_string().contains("m@example.com"), "masked");
        }
        assert_eq!(enhanced_status("5.1.1 x"), Some((5, 1, 1)));
        assert_eq!(enhanced_status("5.1 x"), None);
        assert_eq!(enhanced_status("x 5.1.1"), None);
    }

    #[test]
    fn mail_data_doubles_a_period_that_starts_a_line_and_ends_with_the_dot() {
        let data = MailData(".a\r\n.b\r\nc.d\n.e\r\n..").to_string();
        assert_eq!(data, "..a\r\n..b\r\nc.d\n.e\r\n...\r\n.\r\n");
        assert_eq!(MailData("x\r\n").to_string(), "x\r\n\r\n.\r\n");
    }

    #[test]
    fn pipelining_is_read_from_the_ehlo_reply_not_its_greeting() {
        let reply = |text: &str| text.parse::<Response>().unwrap();
        assert!(offers_pipelining(&reply(
            "250-sink.example\r\n250-SIZE 1000\r\n250-pipelining\r\n250 8BITMIME\r\n"
        )));
        assert!(!offers_pipelining(&reply(
            "250-PIPELINING.example\r\n250-SIZE 1000\r\n250 8BITMIME\r\n"
        )));
        assert!(!offers_pipelining(&reply("250 PIPELINING\r\n")));
    }

    #[test]
    fn a_pipelined_group_is_mail_then_each_rcpt_then_data() {
        let mail = Mail::new(Some("shop@example.com".parse().unwrap()), Vec::new());
        let rcpts = [Rcpt::new("ada@example.com".parse().unwrap(), Vec::new())];
        let group = Pipelined {
            mail: &mail,
            rcpts: &rcpts,
        };
        assert_eq!(
            group.to_string(),
            "MAIL FROM:<shop@example.com>\r\nRCPT TO:<ada@example.com>\r\nDATA\r\n"
        );
    }
}
