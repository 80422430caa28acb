//! `twilio`: Twilio's Messages API
//! (`POST /2010-04-01/Accounts/{sid}/Messages.json`, form-encoded, 201 Created).
//!
//! Each message asks for status callbacks at `<public_url>/webhooks/twilio/status`. The API
//! has no idempotency key for creating messages.

use super::{Accepted, Content, Failure, Outgoing, http};
use crate::config::{Secret, Settings};

/// The Twilio provider.
pub(crate) struct TwilioProvider {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    account_sid: String,
    auth_token: Secret,
    from: String,
    status_callback: String,
}

impl TwilioProvider {
    /// Checks that the account, token and sender are set.
    pub(crate) fn new(settings: &Settings) -> anyhow::Result<TwilioProvider> {
        let missing = |key: &str, env: &str| {
            anyhow::anyhow!("invalid setting `{key}` ({env}): the twilio provider needs it")
        };
        let account_sid = settings
            .twilio_account_sid
            .clone()
            .ok_or_else(|| missing("twilio_account_sid", "LIFECYCLE_TWILIO_ACCOUNT_SID"))?;
        if account_sid.is_empty() || !account_sid.chars().all(|c| c.is_ascii_alphanumeric()) {
            anyhow::bail!(
                "invalid setting `twilio_account_sid` (LIFECYCLE_TWILIO_ACCOUNT_SID): letters and digits only"
            );
        }
        let auth_token = settings
            .twilio_auth_token
            .clone()
            .ok_or_else(|| missing("twilio_auth_token", "LIFECYCLE_TWILIO_AUTH_TOKEN"))?;
        let from = settings
            .twilio_from
            .clone()
            .ok_or_else(|| missing("twilio_from", "LIFECYCLE_TWILIO_FROM"))?;
        let base = settings.twilio_base_url.trim_end_matches('/');
        let endpoint = format!("{base}/2010-04-01/Accounts/{account_sid}/Messages.json")
            .parse()
            .map_err(|e| {
                anyhow::anyhow!(
                    "invalid setting `twilio_base_url` (LIFECYCLE_TWILIO_BASE_URL): {e}"
                )
            })?;
        let public = settings.public_url.as_str().trim_end_matches('/');
        Ok(TwilioProvider {
            client: http::client(settings)?,
            endpoint,
            account_sid,
            auth_token,
            from,
            status_callback: format!("{public}/webhooks/twilio/status"),
        })
    }

    /// Sends an SMS.
    pub(crate) async fn send(&self, message: &Outgoing) -> Result<Accepted, Failure> {
        let Content::Sms { body } = &message.content else {
            return Err(Failure::permanent("the twilio provider sends SMS only"));
        };
        let form = [
            ("To", message.to.as_str()),
            ("From", self.from.as_str()),
            ("Body", body.as_str()),
            ("StatusCallback", self.status_callback.as_str()),
        ];
        let request = self
            .client
            .post(self.endpoint.clone())
            .basic_auth(&self.account_sid, Some(self.auth_token.expose()))
            .form(&form);
        let response = http::send("twilio", request).await?;
        let sid = serde_json::from_str::<serde_json::Value>(&response.body)
            .ok()
            .and_then(|v| v["sid"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "(no sid)".to_owned());
        Ok(Accepted::new(&sid))
    }
}
