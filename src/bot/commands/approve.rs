//! `approve @importer` / `deny @importer`: the old account's answer to a pending import of an
//! unbound code. The importer is named, so several pending imports are never answered at once.

use ruma::OwnedUserId;

use super::{Args, Command, CommandError, Spec};

pub const APPROVE: Spec = Spec {
    name: "approve",
    usage: "approve @importer:server",
    summary: "on the old account: let the named account's pending import go ahead",
    anywhere: false,
};
pub const DENY: Spec = Spec {
    name: "deny",
    usage: "deny @importer:server",
    summary: "on the old account: refuse the named account's pending import",
    anywhere: false,
};

/// Parses the importer's user ID; a bare `approve` is allowed and answered with the list of
/// pending imports, so the user learns which names to give.
pub fn parse(spec: &'static Spec, mut args: Args) -> Result<Command, CommandError> {
    let usage = |message: String| CommandError::Usage { command: spec.name, usage: spec.usage, message };
    let importer = match args.positional() {
        Some(u) => Some(OwnedUserId::try_from(u.as_str()).map_err(|_| {
            usage(format!("name the importing account by its full user ID such as @new:example.org, not `{u}`"))
        })?),
        None => None,
    };
    args.finish().map_err(usage)?;
    Ok(if spec.name == APPROVE.name { Command::Approve(importer) } else { Command::Deny(importer) })
}

#[cfg(test)]
mod tests {
    use super::super::{Place, parse as parse_command};
    use super::*;

    #[test]
    fn approve_names_the_importer() {
        let p = |t: &str| parse_command(t, Place::Dm, "!h").unwrap();
        assert_eq!(p("approve @bob:x.org"), Ok(Command::Approve(Some("@bob:x.org".try_into().unwrap()))));
        assert_eq!(p("deny @bob:x.org"), Ok(Command::Deny(Some("@bob:x.org".try_into().unwrap()))));
        assert_eq!(p("approve"), Ok(Command::Approve(None)));
        assert!(p("approve bob").unwrap_err().to_string().contains("full user ID"));
        assert!(p("approve @a:x.org @b:x.org").unwrap_err().to_string().contains("unexpected argument"));
    }
}
