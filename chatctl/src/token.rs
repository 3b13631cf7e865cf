//! Finding the admin token: `--token`, else `--token-file`, else the first
//! readable file of [`chatd_proto::default_token_paths`], else none.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::ChatctlError;

/// Token files are a few dozen bytes; anything past this is not a token.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// A token and where it came from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub secret: String,
    pub origin: String,
}

/// Picks the token. `defaults` are tried in order; unreadable ones are
/// skipped, since most of them will not exist on a given machine.
pub fn resolve(
    token: Option<&str>,
    token_file: Option<&Path>,
    defaults: &[PathBuf],
) -> Result<Option<Token>, ChatctlError> {
    if let Some(secret) = token {
        return Ok(Some(Token {
            secret: secret.trim().to_owned(),
            origin: "--token".to_owned(),
        }));
    }
    if let Some(path) = token_file {
        let secret = read_token_file(path).map_err(|source| ChatctlError::TokenFile {
            path: path.to_owned(),
            source,
        })?;
        return Ok(Some(Token {
            secret,
            origin: path.display().to_string(),
        }));
    }
    Ok(first_readable(defaults))
}

/// The first of `paths` that can be read, as a token.
pub fn first_readable(paths: &[PathBuf]) -> Option<Token> {
    paths.iter().find_map(|path| {
        read_token_file(path).ok().map(|secret| Token {
            secret,
            origin: path.display().to_string(),
        })
    })
}

fn read_token_file(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_TOKEN_FILE_BYTES)
        .read_to_string(&mut text)?;
    Ok(text.trim().to_owned())
}
