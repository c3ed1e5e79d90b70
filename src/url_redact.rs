//! Hiding the password of a PostgreSQL connection string before it is shown
//! (`Debug`, `Display`, error messages). It reads the string the way
//! tokio-postgres does (libpq's sloppy URL rules and its `key=value` form),
//! so a password holding `/`, `?`, `@`, spaces or quotes is found where the
//! client finds it; what it cannot read is hidden whole. Never logs and
//! never touches the network.

const HIDDEN: &str = "***";

/// `text` with the password replaced by `***`: the `user:password@` part
/// and a `password=` parameter of a URL, or the `password` value of a
/// `key=value` string. Unreadable remainders are replaced by `***` too.
pub(crate) fn redact(text: &str) -> String {
    for prefix in ["postgres://", "postgresql://"] {
        if let Some(rest) = text.strip_prefix(prefix) {
            return format!("{prefix}{}", redact_url(rest));
        }
    }
    redact_key_values(text)
}

/// After the scheme: credentials up to the first `@` (as tokio-postgres
/// reads them), host, path, then `&`-separated query parameters.
fn redact_url(rest: &str) -> String {
    let mut out = String::new();
    let mut rest = rest;
    if let Some(at) = rest.find('@') {
        let creds = &rest[..at];
        match creds.find(':') {
            // An `@` after the host (in the path or query) makes the client
            // read all of it as credentials: hide it whole.
            _ if creds.contains(['/', '?']) => out.push_str(HIDDEN),
            Some(colon) => {
                out.push_str(&creds[..colon]);
                out.push(':');
                out.push_str(HIDDEN);
            }
            None => out.push_str(creds),
        }
        out.push('@');
        rest = &rest[at + 1..];
    }
    let Some(query) = rest.find('?') else {
        out.push_str(rest);
        return out;
    };
    out.push_str(&rest[..=query]);
    let params: Vec<String> = rest[query + 1..]
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((key, _)) if percent_decode(key) == "password" => format!("{key}={HIDDEN}"),
            Some(_) => param.to_owned(),
            None => HIDDEN.to_owned(),
        })
        .collect();
    out.push_str(&params.join("&"));
    out
}

/// `%XX` sequences decoded (lossily), the way URL parameter keys are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;

/// `key = value` pairs separated by whitespace; a value is `'quoted'` or
/// runs to the next whitespace, `\` escaping the next character in both.
fn redact_key_values(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.char_indices().peekable();
    loop {
        copy_whitespace(&mut chars, &mut out);
        let Some(&(start, _)) = chars.peek() else {
            return out;
        };
        let mut end = text.len();
        while let Some(&(i, c)) = chars.peek() {
            if c.is_whitespace() || c == '=' {
                end = i;
                break;
            }
            chars.next();
        }
        let key = &text[start..end];
        out.push_str(key);
        copy_whitespace(&mut chars, &mut out);
        if chars.next().map(|(_, c)| c) != Some('=') {
            out.push_str(HIDDEN);
            return out;
        }
        out.push('=');
        copy_whitespace(&mut chars, &mut out);
        match take_value(text, &mut chars) {
            Some(value) => out.push_str(if key == "password" { HIDDEN } else { value }),
            None => {
                out.push_str(HIDDEN);
                return out;
            }
        }
    }
}

fn copy_whitespace(chars: &mut Chars<'_>, out: &mut String) {
    while let Some((_, c)) = chars.next_if(|(_, c)| c.is_whitespace()) {
        out.push(c);
    }
}

/// The raw text of one value (quotes and escapes included), or `None` when
/// it is missing or its quote is unterminated.
fn take_value<'a>(text: &'a str, chars: &mut Chars<'_>) -> Option<&'a str> {
    let &(start, first) = chars.peek()?;
    if first == '\'' {
        chars.next();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '\'' => return Some(&text[start..=i]),
                _ => {}
            }
        }
        return None;
    }
    let mut end = text.len();
    while let Some(&(i, c)) = chars.peek() {
        if c.is_whitespace() {
            end = i;
            break;
        }
        chars.next();
        if c == '\\' {
            chars.next();
        }
    }
    Some(&text[start..end])
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn urls_lose_their_password_wherever_the_client_finds_it() {
        for (url, shown) in [
            ("postgres://u:pw@h/db", "postgres://u:***@h/db"),
            ("postgresql://u:a/b?c@h:5/db", "postgresql://***@h:5/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://h/db?user=u&password=pw&x=1",
                "postgres://h/db?user=u&password=***&x=1",
            ),
            (
                "postgres://h/db?pass%77ord=pw",
                "postgres://h/db?pass%77ord=***",
            ),
            ("postgres://h/db?broken", "postgres://h/db?***"),
            ("postgres://h/db?password=a@b", "postgres://***@b"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[test]
    fn key_values_lose_their_password() {
        for (text, shown) in [
            ("host=h password=pw user=u", "host=h password=*** user=u"),
            (
                "host=h password = 'a b\\' c' user=u",
                "host=h password = *** user=u",
            ),
            ("password=p\\ w dbname=x", "password=*** dbname=x"),
            ("host=h password='unterminated", "host=h password=***"),
            ("host=h password", "host=h password***"),
            ("", ""),
        ] {
            assert_eq!(redact(text), shown, "{text}");
        }
    }
}
