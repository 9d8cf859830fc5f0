//! `export [--to @new:server] [--only favourites|dms|rooms] [--exclude ROOM]… [--history N] [--file]`:
//! capture the sender's account into a bundle and hand back a one-time transfer code.

use ruma::OwnedUserId;

use super::{Args, Command, CommandError, Spec};
use crate::bundle::Only;

pub const SPEC: Spec = Spec {
    name: "export",
    usage: "export [--to @new:server [--auto]] [--only favourites|dms|rooms] [--exclude ROOM]… [--history N] [--file]",
    summary: "capture this account (rooms, DMs, contacts, preferences, profile) and get a one-time transfer code",
    anywhere: false,
};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Export {
    pub to: Option<OwnedUserId>,
    pub only: Option<Only>,
    pub exclude: Vec<String>,
    pub history: Option<usize>,
    pub file: bool,
    /// Start the transfer as soon as the `--to` account becomes active.
    pub auto: bool,
}

pub fn parse(mut args: Args) -> Result<Command, CommandError> {
    let usage = |message: String| CommandError::Usage { command: SPEC.name, usage: SPEC.usage, message };
    let to = match args.option("--to").map_err(usage)? {
        Some(t) => Some(
            OwnedUserId::try_from(t.as_str())
                .map_err(|_| usage(format!("`--to` takes a full user ID such as @you:example.org, not `{t}`")))?,
        ),
        None => None,
    };
    let only = args.option("--only").map_err(usage)?.map(|o| o.parse()).transpose().map_err(usage)?;
    let exclude = args.options("--exclude").map_err(usage)?;
    for e in &exclude {
        if !e.starts_with('!') && !e.starts_with('#') {
            return Err(usage(format!("`--exclude` takes a room ID (!…) or alias (#…), not `{e}`")));
        }
    }
    let history = match args.option("--history").map_err(usage)? {
        Some(n) => Some(n.parse::<usize>().map_err(|_| usage(format!("`--history` takes a number, not `{n}`")))?),
        None => None,
    };
    let file = args.flag("--file");
    let auto = args.flag("--auto");
    args.finish().map_err(usage)?;
    if auto && to.is_none() {
        return Err(usage("`--auto` needs `--to`: the account whose first activity starts the transfer".into()));
    }
    Ok(Command::Export(Export { to, only, exclude, history, file, auto }))
}

#[cfg(test)]
mod tests {
    use super::super::{Place, parse as parse_command};
    use super::*;

    fn export(text: &str) -> Result<Export, String> {
        match parse_command(text, Place::Dm, "!h").unwrap() {
            Ok(Command::Export(e)) => Ok(e),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn options_parse() {
        let e = export("export --to @new:b.org --only dms --exclude !a:b --exclude '#x:b' --history 5 --file").unwrap();
        assert_eq!(e.to.unwrap().as_str(), "@new:b.org");
        assert_eq!(e.only, Some(Only::Dms));
        assert_eq!(e.exclude, vec!["!a:b", "#x:b"]);
        assert_eq!(e.history, Some(5));
        assert!(e.file);
        assert_eq!(export("export").unwrap(), Export::default());
    }

    #[test]
    fn bad_options_say_what_is_expected() {
        assert!(export("export --to bob").unwrap_err().contains("full user ID"));
        assert!(export("export --only cats").unwrap_err().contains("favourites, dms or rooms"));
        assert!(export("export --history lots").unwrap_err().contains("takes a number"));
        assert!(export("export --exclude general").unwrap_err().contains("room ID"));
        assert!(export("export --force").unwrap_err().contains("unknown option `--force`"));
        assert!(export("export --auto").unwrap_err().contains("`--auto` needs `--to`"));
        assert!(export("export --to @n:b.org --auto").unwrap().auto);
    }
}
