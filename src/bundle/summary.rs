//! What a bundle holds, in counts: shown after `export`, by `keys` and by `handoff inspect`.

use std::fmt;

use super::{Bundle, Priority, RoomKind};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub user: String,
    pub rooms: usize,
    pub dms: usize,
    pub groups: usize,
    pub spaces: usize,
    pub high: usize,
    pub normal: usize,
    pub low: usize,
    pub contacts: usize,
    pub push_rules: usize,
    pub ignored_users: usize,
    pub client_settings: usize,
    pub history_messages: usize,
    pub history_encrypted: usize,
    pub display_name: bool,
    pub avatar: bool,
    pub keys: Option<usize>,
}

impl Summary {
    pub fn of(b: &Bundle) -> Summary {
        let count = |f: &dyn Fn(&super::RoomEntry) -> bool| b.rooms.iter().filter(|r| f(r)).count();
        let push_rules = b.preferences.push_rules.as_ref().map_or(0, |r| {
            let user_rules = |ids: Vec<&str>| ids.into_iter().filter(|id| !id.starts_with('.')).count();
            user_rules(r.override_.iter().map(|r| r.rule_id.as_str()).collect())
                + user_rules(r.content.iter().map(|r| r.rule_id.as_str()).collect())
                + user_rules(r.room.iter().map(|r| r.rule_id.as_str()).collect())
                + user_rules(r.sender.iter().map(|r| r.rule_id.as_str()).collect())
                + user_rules(r.underride.iter().map(|r| r.rule_id.as_str()).collect())
        });
        Summary {
            user: b.source.user_id.to_string(),
            rooms: b.rooms.len(),
            dms: count(&|r| r.kind == RoomKind::Dm),
            groups: count(&|r| r.kind == RoomKind::Group),
            spaces: count(&|r| r.kind == RoomKind::Space),
            high: count(&|r| r.priority == Priority::High),
            normal: count(&|r| r.priority == Priority::Normal),
            low: count(&|r| r.priority == Priority::Low),
            contacts: b.contacts.len(),
            push_rules,
            ignored_users: b.preferences.ignored_users.len(),
            client_settings: b.preferences.client_settings.len(),
            history_messages: b.rooms.iter().filter_map(|r| r.history.as_ref()).map(|h| h.messages.len()).sum(),
            history_encrypted: b.rooms.iter().filter_map(|r| r.history.as_ref()).map(|h| h.encrypted_count).sum(),
            display_name: b.profile.display_name.is_some(),
            avatar: b.profile.avatar_url.is_some(),
            keys: b.room_keys.as_ref().map(|k| k.encrypted_len),
        }
    }

    /// One line per topic, for the bot's chat (keys come with its `keys` command).
    pub fn lines(&self) -> Vec<String> {
        self.lines_with("send `keys` to see how")
    }

    /// The same for a terminal, where keys come with `handoff export`'s own options.
    pub fn on_device(&self) -> String {
        self.lines_with("export with --recovery-key, or --room-keys FILE from Element, to carry them").join("\n")
    }

    fn lines_with(&self, keys_hint: &str) -> Vec<String> {
        let mut lines = vec![
            format!("Rooms: {} ({} DMs, {} group rooms, {} spaces)", self.rooms, self.dms, self.groups, self.spaces),
            format!("Priority: {} favourites, {} normal, {} low priority", self.high, self.normal, self.low),
            format!("Contacts: {}", self.contacts),
            format!(
                "Preferences: {} custom push rules, {} ignored users, {} client settings",
                self.push_rules, self.ignored_users, self.client_settings
            ),
            format!(
                "Profile: {}",
                match (self.display_name, self.avatar) {
                    (true, true) => "display name and avatar",
                    (true, false) => "display name",
                    (false, true) => "avatar",
                    (false, false) => "none set",
                }
            ),
        ];
        if self.history_messages + self.history_encrypted > 0 {
            lines.push(format!(
                "History: {} messages copied, {} encrypted messages counted (not copied)",
                self.history_messages, self.history_encrypted
            ));
        }
        lines.push(match self.keys {
            Some(len) => format!("Encryption keys: attached ({len} bytes, still encrypted with your passphrase)"),
            None => format!("Encryption keys: none attached ({keys_hint})"),
        });
        lines
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines().join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bundle without keys says how to carry them where it is shown: the bot's command in chat,
    /// `handoff export`'s options in a terminal (a terminal has no `keys` command).
    #[test]
    fn missing_keys_are_explained_for_where_the_summary_is_read() {
        let summary = Summary::of(&crate::bundle::tests::sample());
        assert_eq!(summary.keys, None);
        let chat = summary.lines().join("\n");
        assert!(chat.ends_with("Encryption keys: none attached (send `keys` to see how)"), "{chat}");
        let terminal = summary.on_device();
        assert!(
            terminal.ends_with("(export with --recovery-key, or --room-keys FILE from Element, to carry them)"),
            "{terminal}"
        );
        assert!(!terminal.contains("send `keys`"), "{terminal}");
    }
}
