//! `webhook`: POSTs the rendered message as JSON (DESIGN.md's fields) to `LIFECYCLE_WEBHOOK_URL`.
//!
//! The body is signed with HMAC-SHA256 under `LIFECYCLE_WEBHOOK_SECRET`:
//! `X-Lifecycle-Signature: sha256=<hex>`. `Idempotency-Key: lifecycle-<message id>` lets the
//! receiver drop a second copy (a retry after a timeout).

use aws_lc_rs::hmac;

use super::{Accepted, Failure, Outgoing, http};
use crate::config::Settings;

/// The webhook provider.
pub(crate) struct WebhookProvider {
    client: reqwest::Client,
    url: reqwest::Url,
    key: hmac::Key,
}

impl WebhookProvider {
    /// Checks that the URL and secret are set.
    pub(crate) fn new(settings: &Settings) -> anyhow::Result<WebhookProvider> {
        let url = settings.webhook_url.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "invalid setting `webhook_url` (LIFECYCLE_WEBHOOK_URL): the webhook provider needs it"
            )
        })?;
        let secret = settings.webhook_secret.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "invalid setting `webhook_secret` (LIFECYCLE_WEBHOOK_SECRET): the webhook provider signs with it"
            )
        })?;
        Ok(WebhookProvider {
            client: http::client(settings)?,
            url: url.as_str().parse()?,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes()),
        })
    }

    /// Posts the message.
    pub(crate) async fn send(&self, message: &Outgoing) -> Result<Accepted, Failure> {
        let body = message.json_body();
        let signature = hex::encode(hmac::sign(&self.key, &body));
        let request = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header(
                "idempotency-key",
                format!("lifecycle-{}", message.message_id),
            )
            .header("x-lifecycle-signature", format!("sha256={signature}"))
            .body(body);
        let response = http::send("webhook", request).await?;
        let reference = serde_json::from_str::<serde_json::Value>(&response.body)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("lifecycle-{}", message.message_id));
        Ok(Accepted::new(&reference))
    }
}
