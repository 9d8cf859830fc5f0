//! The two appservice registrations and `generate-registration`.
//!
//! - main (`handoff-registration.yaml`): the homeserver pushes the bot's rooms to `appservice.address`;
//!   exclusive namespace for the bot and the registration's own user (`<bot>-appservice`).
//! - acting (`handoff-acting-registration.yaml`): `url: null`, non-exclusive `@.*:<domain>$`; its
//!   `as_token` with `?user_id=` lets handoff act for local users, and nothing is pushed to it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::Rng;
use rand::distr::Alphanumeric;
use ruma::api::appservice::{Namespace, Namespaces, Registration, RegistrationInit};

use crate::config::{Config, PLACEHOLDER_TOKEN};

pub const MAIN_FILE: &str = "handoff-registration.yaml";
pub const ACTING_FILE: &str = "handoff-acting-registration.yaml";

/// 64 characters from a CSPRNG (rand's `ThreadRng` is a CSPRNG seeded from the OS).
pub fn generate_token() -> String {
    rand::rng().sample_iter(&Alphanumeric).take(64).map(char::from).collect()
}

pub fn acting_id(config: &Config) -> String {
    format!("{}-acting", config.appservice.id)
}

/// `@.*:<domain>$`-style regexes: Synapse matches from the start, so only the end needs an anchor.
fn domain_regex(config: &Config) -> String {
    regex_syntax::escape(config.homeserver.domain.as_str())
}

/// The main registration's own user. Not the bot: Synapse refuses `/sync` to a registration's
/// sender, and the bot's device must sync (as mautrix bridges, whose bot is a namespace user too).
/// Nobody ever sees it; handoff asserts the bot's identity on every request it makes as the bot.
pub fn main_sender_localpart(config: &Config) -> String {
    format!("{}-appservice", config.appservice.bot.username)
}

pub fn main_registration(config: &Config) -> Registration {
    let mut namespaces = Namespaces::new();
    // The bot and the registration's own user, exclusively: no one else may register either.
    namespaces.users.push(Namespace::new(
        true,
        format!("@{}(-appservice)?:{}$", regex_syntax::escape(&config.appservice.bot.username), domain_regex(config)),
    ));
    let mut reg: Registration = RegistrationInit {
        id: config.appservice.id.clone(),
        url: Some(config.appservice.address.to_string()),
        as_token: config.appservice.as_token.expose().to_owned(),
        hs_token: config.appservice.hs_token.expose().to_owned(),
        sender_localpart: main_sender_localpart(config),
        namespaces,
        rate_limited: Some(false),
        protocols: None,
    }
    .into();
    reg.receive_ephemeral = false;
    reg
}

pub fn acting_registration(config: &Config) -> Registration {
    let mut namespaces = Namespaces::new();
    namespaces.users.push(Namespace::new(false, format!("@.*:{}$", domain_regex(config))));
    RegistrationInit {
        id: acting_id(config),
        url: None,
        as_token: config.appservice.acting.as_token.expose().to_owned(),
        hs_token: config.appservice.acting.hs_token.expose().to_owned(),
        // A user of its own, so that it never acts as the bot by default.
        sender_localpart: format!("{}-acting", config.appservice.bot.username),
        namespaces,
        rate_limited: Some(false),
        protocols: None,
    }
    .into()
}

/// What `generate-registration` wrote.
pub struct Generated {
    pub main: PathBuf,
    pub acting: PathBuf,
    pub tokens_generated: usize,
}

/// Fills `generate` tokens in the config file (keeping its comments), then writes both registrations.
pub fn generate(config_path: &Path) -> Result<Generated> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read config {}", config_path.display()))?;
    // Parse first: a broken config must not be half-rewritten.
    Config::parse(&text).map_err(|m| anyhow::anyhow!("{}: {m}", config_path.display()))?;
    let mut text = text;
    let mut tokens_generated = 0;
    for key in
        ["appservice.as_token", "appservice.hs_token", "appservice.acting.as_token", "appservice.acting.hs_token"]
    {
        match set_yaml_value(&text, key, PLACEHOLDER_TOKEN, &generate_token()) {
            Some(new) => {
                text = new;
                tokens_generated += 1;
            }
            None if yaml_value(&text, key).is_none() => {
                text = insert_yaml_value(&text, key, &generate_token())
                    .with_context(|| format!("cannot add {key} to the config"))?;
                tokens_generated += 1;
            }
            None => {}
        }
    }
    let config = Config::parse(&text).map_err(|m| anyhow::anyhow!("after writing tokens: {m}"))?;
    if tokens_generated > 0 {
        write_private(config_path, &text)?;
    }
    let dir = config_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let main = dir.join(MAIN_FILE);
    let acting = dir.join(ACTING_FILE);
    write_private(&main, &serde_norway::to_string(&main_registration(&config))?)?;
    write_private(&acting, &serde_norway::to_string(&acting_registration(&config))?)?;
    Ok(Generated { main, acting, tokens_generated })
}

/// Writes a file that holds secrets: mode 0600 from its creation (a fresh temporary file beside
/// it, which tempfile makes 0600 under a name nobody can guess), then put in place whole.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    let mut file = private_file_beside(path)?;
    std::io::Write::write_all(&mut file, contents.as_bytes())?;
    file.as_file().sync_all()?;
    file.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A new temporary file (mode 0600) in `path`'s folder, to be persisted as `path`.
pub fn private_file_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write into {}", dir.display()))
}

/// One `key: value` line of a block-style YAML mapping, with the dotted path of its key.
struct Line<'a> {
    path: String,
    indent: usize,
    value: &'a str,
    value_start: usize,
}

/// Walks the block mappings of a YAML text, yielding each key line with its dotted path.
/// By hand: no serde YAML crate keeps the comments of a file it writes back.
/// Good enough for configs shaped like the example (block mappings, one key per line).
fn key_lines(text: &str) -> Vec<(usize, Line<'_>)> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('-') {
            continue;
        }
        let indent = raw.len() - trimmed.len();
        let Some(colon) = trimmed.find(':') else {
            continue;
        };
        let key = trimmed[..colon].trim().trim_matches('"').trim_matches('\'').to_owned();
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        let path = stack.iter().map(|(_, k)| k.as_str()).chain([key.as_str()]).collect::<Vec<_>>().join(".");
        let after = &trimmed[colon + 1..];
        let value = after.split(" #").next().unwrap_or("").trim();
        let value_start = indent + colon + 1 + (after.len() - after.trim_start().len());
        stack.push((indent, key));
        out.push((n, Line { path, indent, value, value_start }));
    }
    out
}

fn unquote(v: &str) -> &str {
    v.trim_matches('"').trim_matches('\'')
}

fn yaml_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    key_lines(text).into_iter().find(|(_, l)| l.path == key).map(|(_, l)| unquote(l.value))
}

/// Replaces the value of `key` if it currently equals `expect`; `None` if the key is absent or differs.
fn set_yaml_value(text: &str, key: &str, expect: &str, value: &str) -> Option<String> {
    let (line_no, start, current) = key_lines(text)
        .into_iter()
        .find(|(_, l)| l.path == key)
        .map(|(n, l)| (n, l.value_start, l.value.to_owned()))?;
    if unquote(&current) != expect {
        return None;
    }
    let mut out = String::with_capacity(text.len() + value.len());
    for (n, raw) in text.split_inclusive('\n').enumerate() {
        if n == line_no {
            let rest = &raw[start..];
            let comment = rest.find(" #").map(|i| &rest[i..]).unwrap_or("");
            let newline = if raw.ends_with('\n') && !comment.ends_with('\n') { "\n" } else { "" };
            out.push_str(&raw[..start]);
            out.push_str(value);
            out.push_str(comment);
            out.push_str(newline);
        } else {
            out.push_str(raw);
        }
    }
    Some(out)
}

/// Adds `key: value` under its parent mapping (which must exist, or be the top level).
fn insert_yaml_value(text: &str, key: &str, value: &str) -> Option<String> {
    let (parent, leaf) = key.rsplit_once('.').unwrap_or(("", key));
    let lines = key_lines(text);
    let (after_line, indent) = if parent.is_empty() {
        (text.lines().count(), 0)
    } else {
        let (n, l) = lines.iter().find(|(_, l)| l.path == parent)?;
        if !l.value.is_empty() {
            return None;
        }
        // Last line that belongs to the parent's block.
        let child_indent = lines
            .iter()
            .find(|(m, c)| m > n && c.path.starts_with(&format!("{parent}.")))
            .map(|(_, c)| c.indent)
            .unwrap_or(l.indent + 4);
        let last = lines
            .iter()
            .filter(|(m, c)| *m > *n && c.path.starts_with(&format!("{parent}.")))
            .map(|(m, _)| *m)
            .max()
            .unwrap_or(*n);
        (last + 1, child_indent)
    };
    let mut out = String::new();
    for (n, raw) in text.split_inclusive('\n').enumerate() {
        if n == after_line {
            out.push_str(&format!("{}{leaf}: {value}\n", " ".repeat(indent)));
        }
        out.push_str(raw);
    }
    if after_line >= text.lines().count() {
        if !out.ends_with('\n') && !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!("{}{leaf}: {value}\n", " ".repeat(indent)));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../bridge-config.yaml");

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = generate_token();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, generate_token());
    }

    #[test]
    fn replacing_a_token_keeps_comments() {
        let out = set_yaml_value(EXAMPLE, "appservice.acting.hs_token", "generate", "XYZ").unwrap();
        assert!(out.contains("        hs_token: XYZ\n"));
        // The main hs_token is untouched, and so is every comment.
        assert!(out.contains("    hs_token: generate\n"));
        assert_eq!(
            out.lines().filter(|l| l.trim_start().starts_with('#')).count(),
            EXAMPLE.lines().filter(|l| l.trim_start().starts_with('#')).count()
        );
        assert!(set_yaml_value(&out, "appservice.acting.hs_token", "generate", "ABC").is_none());
    }

    #[test]
    fn missing_token_keys_are_inserted_under_their_parent() {
        let text = "homeserver:\n  address: http://h\n  domain: d.org\nappservice:\n  port: 1234\n";
        let out = insert_yaml_value(text, "appservice.as_token", "T").unwrap();
        let config = Config::parse(&out).unwrap();
        assert_eq!(config.appservice.as_token.expose(), "T");
        assert_eq!(config.appservice.port.0, 1234);
    }

    #[test]
    fn registrations_have_the_documented_shape() {
        let mut config = Config::parse(&EXAMPLE.replace("example.org", "my.server")).unwrap();
        config.appservice.as_token = crate::config::Secret::new("a".repeat(64));
        let main = serde_norway::to_string(&main_registration(&config)).unwrap();
        assert!(main.contains("url: http://127.0.0.1:29340"), "{main}");
        assert!(main.contains("exclusive: true"));
        assert!(main.contains(r"regex: '@handoff(-appservice)?:my\.server$'"), "{main}");
        assert!(main.contains("sender_localpart: handoff-appservice"), "{main}");
        assert!(main.contains("rate_limited: false"));
        let acting = serde_norway::to_string(&acting_registration(&config)).unwrap();
        assert!(acting.contains("url: null"), "{acting}");
        assert!(acting.contains("id: handoff-acting"));
        assert!(acting.contains(r"regex: '@.*:my\.server$'"), "{acting}");
        assert!(acting.contains("exclusive: false"));
    }

    #[test]
    fn regex_metacharacters_in_names_are_escaped() {
        let config = Config::parse(&EXAMPLE.replace("domain: example.org", "domain: my-host.example:8448")).unwrap();
        let acting = serde_norway::to_string(&acting_registration(&config)).unwrap();
        assert!(acting.contains(r"regex: '@.*:my\-host\.example:8448$'"), "{acting}");
    }
}
