//! `sendgrid`: SendGrid's v3 mail send API (`POST /v3/mail/send`, 202 Accepted).
//!
//! The message id travels as `custom_args.message_id`, which SendGrid's event webhook echoes,
//! and the `X-Lifecycle-*` headers go along. SendGrid's answer carries its id in
//! `X-Message-Id`. The API has no idempotency key.

use serde_json::json;

use super::{Accepted, Content, Failure, Outgoing, http};
use crate::config::{Secret, Settings};

/// The SendGrid provider.
pub(crate) struct SendgridProvider {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    api_key: Secret,
    from: lettre::message::Mailbox,
}

impl SendgridProvider {
    /// Checks that the API key is set.
    pub(crate) fn new(settings: &Settings) -> anyhow::Result<SendgridProvider> {
        let api_key = settings.sendgrid_api_key.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "invalid setting `sendgrid_api_key` (LIFECYCLE_SENDGRID_API_KEY): the sendgrid provider needs it"
            )
        })?;
        let base = settings.sendgrid_base_url.trim_end_matches('/');
        let endpoint = format!("{base}/v3/mail/send").parse().map_err(|e| {
            anyhow::anyhow!(
                "invalid setting `sendgrid_base_url` (LIFECYCLE_SENDGRID_BASE_URL): {e}"
            )
        })?;
        Ok(SendgridProvider {
            client: http::client(settings)?,
            endpoint,
            api_key,
            from: settings.from.clone(),
        })
    }

    /// Sends an email.
    pub(crate) async fn send(&self, message: &Outgoing) -> Result<Accepted, Failure> {
        let Content::Email {
            rendered,
            list_unsubscribe,
            ..
        } = &message.content
        else {
            return Err(Failure::permanent("the sendgrid provider sends email only"));
        };
        let mut from = json!({"email": self.from.email.to_string()});
        if let Some(name) = &self.from.name {
            from["name"] = name.clone().into();
        }
        let body = json!({
            "personalizations": [{"to": [{"email": message.to}]}],
            "from": from,
            "subject": rendered.subject,
            "content": [
                {"type": "text/plain", "value": rendered.text},
                {"type": "text/html", "value": rendered.html},
            ],
            "headers": {
                "X-Lifecycle-Trigger": message.trigger.as_str(),
                "X-Lifecycle-Message-Id": message.message_id.to_string(),
                "List-Unsubscribe": list_unsubscribe,
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
            "custom_args": {"message_id": message.message_id.to_string()},
        });
        let request = self
            .client
            .post(self.endpoint.clone())
            .bearer_auth(self.api_key.expose())
            .json(&body);
        let response = http::send("sendgrid", request).await?;
        let reference = response
            .headers
            .get("x-message-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("lifecycle-{}", message.message_id));
        Ok(Accepted::new(&reference))
    }
}
