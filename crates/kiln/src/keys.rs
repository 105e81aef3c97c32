//! `kiln keys`: make, list and revoke API keys in a server's data
//! directory, while the server runs (it reads the key file again within
//! a quarter of a second of a change).

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use kiln::config::Config;
use kiln_auth::{Capabilities, KeyFile, KeyInfo};

#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Make a key; it is printed once, alone on the last line of stdout,
    /// and kept only as its hash.
    Create {
        #[command(flatten)]
        place: DataDir,
        /// The organisation the key belongs to.
        #[arg(long)]
        org: String,
        /// What the key may do, comma-separated: cache-read, cas-write,
        /// ac-write, execute, register-executor (default: cache-read,
        /// cas-write, execute: a developer's key, which cannot write the
        /// Action Cache).
        #[arg(long = "capability", value_delimiter = ',', num_args = 1..)]
        capabilities: Vec<String>,
    },
    /// List every key (never the keys themselves), revoked ones included.
    List {
        #[command(flatten)]
        place: DataDir,
    },
    /// Revoke a key by its id; a running server refuses it within a second.
    Revoke {
        #[command(flatten)]
        place: DataDir,
        /// The key's id, as `kiln keys list` shows it.
        id: String,
    },
}

/// Whose keys: the data directory `kiln serve` uses.
#[derive(clap::Args)]
pub struct DataDir {
    /// The server's data directory (as `kiln serve --data-dir`).
    #[arg(long, env = "KILN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The server's config file, for its data_dir.
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
}

impl DataDir {
    fn key_file(&self) -> anyhow::Result<KeyFile> {
        let data_dir = match &self.data_dir {
            Some(dir) => dir.clone(),
            None => Config::load(self.config.as_deref())?.data_dir,
        };
        Ok(KeyFile::in_dir(&data_dir))
    }
}

pub fn run(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            place,
            org,
            capabilities,
        } => {
            let capabilities = match capabilities.is_empty() {
                true => Capabilities::DEVELOPER,
                false => Capabilities::parse_list(&capabilities.join(","))
                    .map_err(|e| anyhow::anyhow!("--capability: {e}"))?,
            };
            let file = place.key_file()?;
            let (info, key) = file.create(&org, capabilities)?;
            println!(
                "created key {} of organisation {} with {} (in {}); it is shown once:",
                info.id,
                info.org,
                info.capabilities,
                file.path().display()
            );
            println!("{}", key.expose());
        }
        KeysCommand::List { place } => {
            let keys = place.key_file()?.list()?;
            println!(
                "{:<14} {:<20} {:<22} {:<42} STATE",
                "ID", "ORG", "CREATED", "CAPABILITIES"
            );
            for key in keys {
                println!(
                    "{:<14} {:<20} {:<22} {:<42} {}",
                    key.id,
                    key.org,
                    when(key.created_unix_s),
                    key.capabilities.to_string(),
                    state(&key)
                );
            }
        }
        KeysCommand::Revoke { place, id } => {
            let info = place.key_file()?.revoke(&id)?;
            println!(
                "revoked key {} of organisation {} ({})",
                info.id,
                info.org,
                state(&info)
            );
        }
    }
    Ok(())
}

fn when(unix_s: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_s)).to_string()
}

fn state(key: &KeyInfo) -> String {
    match key.revoked_unix_s {
        Some(at) => format!("revoked {}", when(at)),
        None => "active".into(),
    }
}
