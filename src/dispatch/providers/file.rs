//! The `file` provider: each message becomes files in the outbox directory, written
//! atomically (temporary name, then rename), named by message id so a resend overwrites.

use std::path::PathBuf;

use anyhow::Context;

use super::{Accepted, Content, Failure, Outgoing};
use crate::config::Settings;

/// Writes `<id>.eml` (email) and `<id>.json` (email and SMS) to a directory.
pub(crate) struct FileProvider {
    dir: PathBuf,
}

impl FileProvider {
    /// A provider writing to `outbox_dir`, created when missing.
    pub(crate) fn new(settings: &Settings) -> anyhow::Result<FileProvider> {
        let dir = settings.outbox_dir.clone();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating outbox directory {}", dir.display()))?;
        Ok(FileProvider { dir })
    }

    pub(super) async fn send(&self, message: &Outgoing) -> Result<Accepted, Failure> {
        let stem = format!(
            "{}-{}-{}",
            message.message_id,
            message.trigger.as_str(),
            message.channel.as_str()
        );
        let json = serde_json::to_vec_pretty(&message.to_json()).expect("JSON of strings");
        let main = match &message.content {
            Content::Email { .. } => {
                let mime = message.mime()?;
                self.write(&format!("{stem}.json"), &json).await?;
                self.write(&format!("{stem}.eml"), &mime).await?
            }
            Content::Sms { .. } => self.write(&format!("{stem}.json"), &json).await?,
        };
        Ok(Accepted {
            reference: main.display().to_string(),
        })
    }

    async fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, Failure> {
        let path = self.dir.join(name);
        let temporary = self.dir.join(format!(".{name}.tmp"));
        let io = |e: std::io::Error| {
            Failure::transient(None, format!("writing {}: {e}", path.display()))
        };
        tokio::fs::write(&temporary, bytes).await.map_err(io)?;
        tokio::fs::rename(&temporary, &path).await.map_err(io)?;
        Ok(path)
    }
}
