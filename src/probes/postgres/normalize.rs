//! Query text without its literals: what the agent may store of another session's statement.
//!
//! A statement in pg_stat_activity may carry secrets (`ALTER ROLE app PASSWORD '...'`, keys in
//! INSERTs, connection strings). Every constant is replaced by `?` and every comment removed,
//! keeping the statement's shape (keywords, identifiers, operators, `$n` parameters) so a DBA
//! still sees what is blocked.
//!
//! Whether a backslash escapes a quote in a plain '...' string depends on the session's
//! standard_conforming_strings, which the agent cannot know for another session. So the text is
//! read both ways and a character is kept only if it is code in both readings: whichever
//! reading the server used, nothing inside one of its literals or comments survives. A
//! statement cut short (pg_stat_activity truncates) ends inside its last literal, which is
//! removed to the end.
//!
//! Written by hand: the job is PostgreSQL's lexical rules for literals and comments only, which
//! no maintained crate offers without a full parser that would reject truncated text.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Code,
    Comment,
    Literal,
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

/// The end (exclusive) of a quoted string starting at `open` (the quote), or the text's end.
fn string_end(s: &[char], open: usize, backslash: bool) -> usize {
    let mut i = open + 1;
    while i < s.len() {
        match s[i] {
            '\\' if backslash => i += 2,
            '\'' if s.get(i + 1) == Some(&'\'') => i += 2,
            '\'' => return i + 1,
            _ => i += 1,
        }
    }
    s.len()
}

/// `$tag$` starting at `i`, if there is one there.
fn dollar_tag(s: &[char], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if s.get(j).is_some_and(|c| c.is_ascii_digit()) {
        return None; // a parameter ($1)
    }
    while j < s.len() && (s[j].is_alphanumeric() || s[j] == '_') {
        j += 1;
    }
    (s.get(j) == Some(&'$')).then_some(j + 1)
}

/// Classifies every character under one reading of backslashes in plain strings.
fn classify(s: &[char], backslash_escapes: bool) -> Vec<Class> {
    let mut out = vec![Class::Code; s.len()];
    let mut i = 0;
    let mark = |out: &mut Vec<Class>, from: usize, to: usize, c: Class| {
        for x in &mut out[from..to.min(s.len())] {
            *x = c;
        }
    };
    while i < s.len() {
        let prev_ident = i > 0 && is_ident(s[i - 1]);
        match s[i] {
            '-' if s.get(i + 1) == Some(&'-') => {
                let end = s[i..]
                    .iter()
                    .position(|&c| c == '\n')
                    .map_or(s.len(), |p| i + p);
                mark(&mut out, i, end, Class::Comment);
                i = end;
            }
            '/' if s.get(i + 1) == Some(&'*') => {
                // Block comments nest in PostgreSQL.
                let (mut depth, mut j) = (1, i + 2);
                while j < s.len() && depth > 0 {
                    if s[j] == '/' && s.get(j + 1) == Some(&'*') {
                        depth += 1;
                        j += 2;
                    } else if s[j] == '*' && s.get(j + 1) == Some(&'/') {
                        depth -= 1;
                        j += 2;
                    } else {
                        j += 1;
                    }
                }
                mark(&mut out, i, j, Class::Comment);
                i = j;
            }
            '\'' => {
                // A prefix letter glued to the quote makes an E'', B'', X'', N'' or U&''
                // string; E'' strings always take backslash escapes.
                let (start, escapes) = match (i.checked_sub(1).map(|p| s[p]), i.checked_sub(2)) {
                    (Some('E' | 'e'), p) if p.is_none_or(|p| !is_ident(s[p])) => (i - 1, true),
                    (Some('B' | 'b' | 'X' | 'x' | 'N' | 'n'), p)
                        if p.is_none_or(|p| !is_ident(s[p])) =>
                    {
                        (i - 1, backslash_escapes)
                    }
                    (Some('&'), Some(p))
                        if matches!(s[p], 'U' | 'u') && (p == 0 || !is_ident(s[p - 1])) =>
                    {
                        (p, backslash_escapes)
                    }
                    _ => (i, backslash_escapes),
                };
                let end = string_end(s, i, escapes);
                mark(&mut out, start, end, Class::Literal);
                i = end;
            }
            '"' => {
                // A quoted identifier: code, but its inside is no place to look for quotes.
                let mut j = i + 1;
                while j < s.len() {
                    if s[j] == '"' {
                        if s.get(j + 1) == Some(&'"') {
                            j += 2;
                            continue;
                        }
                        j += 1;
                        break;
                    }
                    j += 1;
                }
                i = j.max(i + 1);
            }
            '$' if !prev_ident => match dollar_tag(s, i) {
                Some(after) => {
                    let tag = &s[i..after];
                    let close = (after..=s.len().saturating_sub(tag.len()))
                        .find(|&k| &s[k..k + tag.len()] == tag)
                        .map_or(s.len(), |k| k + tag.len());
                    mark(&mut out, i, close, Class::Literal);
                    i = close;
                }
                None => i += 1,
            },
            c if !prev_ident
                && (c.is_ascii_digit()
                    || (c == '.' && s.get(i + 1).is_some_and(char::is_ascii_digit))) =>
            {
                // A number: digits, a fraction, an exponent with its sign, 0x/0o/0b forms and
                // underscores (PostgreSQL 16) all belong to it.
                let mut j = i + 1;
                while j < s.len() {
                    let d = s[j];
                    let exp_sign = matches!(d, '+' | '-') && matches!(s[j - 1], 'e' | 'E');
                    if d.is_ascii_alphanumeric() || d == '.' || d == '_' || exp_sign {
                        j += 1;
                    } else {
                        break;
                    }
                }
                mark(&mut out, i, j, Class::Literal);
                i = j;
            }
            _ => i += 1,
        }
    }
    out
}

/// `sql` with every literal replaced by `?` and every comment by a space.
pub fn normalize(sql: &str) -> String {
    let s: Vec<char> = sql.chars().collect();
    let a = classify(&s, false);
    let b = classify(&s, true);
    let mut out = String::with_capacity(sql.len());
    let mut last = Class::Code;
    for (i, &c) in s.iter().enumerate() {
        let class = match (a[i], b[i]) {
            (Class::Literal, _) | (_, Class::Literal) => Class::Literal,
            (Class::Comment, _) | (_, Class::Comment) => Class::Comment,
            _ => Class::Code,
        };
        match class {
            Class::Code => out.push(c),
            Class::Literal if last != Class::Literal => out.push('?'),
            Class::Comment if last != Class::Comment => out.push(' '),
            _ => {}
        }
        last = class;
    }
    out.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn literals_of_every_kind_go() {
        for (sql, want) in [
            (
                "ALTER ROLE app PASSWORD 'S3cret-x'",
                "ALTER ROLE app PASSWORD ?",
            ),
            ("SELECT E'it\\'s S3cret', 1", "SELECT ?, ?"),
            ("SELECT $$S3cret$$, $tag$a $$ b$tag$", "SELECT ?, ?"),
            (
                "SELECT * FROM t1 WHERE a = $1 AND b = 1.5e-3",
                "SELECT * FROM t1 WHERE a = $1 AND b = ?",
            ),
            ("SELECT x'1F', U&'d\\0061t', n'x'", "SELECT ?, ?, ?"),
            (
                "UPDATE \"we'ird\" SET a = 'x' -- S3cret\n",
                "UPDATE \"we'ird\" SET a = ?",
            ),
            ("SELECT 1 /* a /* nested */ S3cret */ + 2", "SELECT ?   + ?"),
            ("INSERT INTO k VALUES ('S3cret-x", "INSERT INTO k VALUES (?"),
        ] {
            assert_eq!(normalize(sql), want, "{sql}");
        }
    }

    #[test]
    fn both_readings_of_a_backslash_are_covered() {
        // With standard_conforming_strings on, 'a\' ends at its second quote and 'S3cret' is
        // a second literal; with it off, the first literal runs on to the second quote and a
        // third one opens before FROM. Either way the secret is gone (with more, here).
        let sql = "SELECT 'a\\', 'S3cret' FROM t";
        assert_eq!(normalize(sql), "SELECT ?");
        let sql = "SELECT 'a\\', 'S3cret' FROM t WHERE b = 'c'";
        assert_eq!(normalize(sql), "SELECT ?");
    }

    /// A secret inside any kind of literal, in any statement around it.
    fn secret_literal() -> impl Strategy<Value = String> {
        let secret = "S3cret[a-z]{0,4}";
        prop_oneof![
            secret.prop_map(|s| format!("'{s}'")),
            secret.prop_map(|s| format!("'x''{s}'")),
            secret.prop_map(|s| format!("E'\\'{s}'")),
            secret.prop_map(|s| format!("$${s}$$")),
            secret.prop_map(|s| format!("$q${s}$q$")),
            secret.prop_map(|s| format!("/* {s} */")),
            secret.prop_map(|s| format!("-- {s}\n")),
        ]
    }

    /// A complete token, as PostgreSQL reads it whatever standard_conforming_strings says.
    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z_][a-z0-9_]{0,6}",
            "[0-9]{1,4}(\\.[0-9]{1,3})?",
            "[=<>+*/,().;]",
            "'[a-z0-9 ]{0,6}'",
            "'[a-z]{0,3}''[a-z]{0,3}'",
            "E'[a-z]{0,3}\\\\'[a-z]{0,3}'",
            "\\$\\$[a-z ']{0,6}\\$\\$",
            "/\\* [a-z']{0,5} \\*/",
            "\"[a-z ']{0,5}\"",
            "\\$[1-9]",
        ]
    }

    proptest! {
        #[test]
        fn no_literal_survives(
            before in proptest::collection::vec(token(), 0..8),
            lit in secret_literal(),
            after in proptest::collection::vec(token(), 0..8),
            cut in 0usize..120,
        ) {
            let text = format!("SELECT {} {lit} {}", before.join(" "), after.join(" "));
            let n = normalize(&text);
            prop_assert!(!n.contains("S3cret"), "{text:?} -> {n:?}");
            // Truncated anywhere (pg_stat_activity cuts long statements).
            let t: String = text.chars().take(cut).collect();
            let n = normalize(&t);
            prop_assert!(!n.contains("S3cret"), "{t:?} -> {n:?}");
            // The code around it stays: the statement keeps its first keyword.
            prop_assert!(normalize(&text).starts_with("SELECT"));
        }

        #[test]
        fn never_panics(text in "\\PC{0,200}") {
            let n = normalize(&text);
            prop_assert!(n.chars().count() <= text.chars().count() + 1);
        }
    }
}
