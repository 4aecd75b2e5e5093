//! os-release(5): what distribution and release an image root is.

use crate::image::open::RootFs;
use anyhow::Result;
use std::collections::BTreeMap;

/// The os-release of an image root: `/etc/os-release`, else `/usr/lib/os-release`
/// (os-release(5)); empty if neither exists. On Ubuntu the former is a symlink to
/// `../usr/lib/os-release`, which [`RootFs`] follows.
pub fn read(root: &RootFs) -> Result<BTreeMap<String, String>> {
    for p in ["/etc/os-release", "/usr/lib/os-release"] {
        if let Some(bytes) = root.read_optional(p)? {
            return Ok(parse_os_release(&String::from_utf8_lossy(&bytes)));
        }
    }
    Ok(BTreeMap::new())
}

/// Parse os-release(5) text: `KEY=value` lines, values optionally in double or
/// single quotes, backslash escapes in double quotes and bare values; comments and
/// blank lines skipped.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, raw)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        map.insert(key.to_string(), unquote_shell_value(raw.trim()));
    }
    map
}

/// The value of a shell-style assignment: concatenated bare, "double" and 'single'
/// quoted parts.
fn unquote_shell_value(raw: &str) -> String {
    let mut out = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some(e @ ('"' | '\\' | '$' | '`')) => out.push(e),
                            Some(e) => {
                                out.push('\\');
                                out.push(e);
                            }
                            None => out.push('\\'),
                        },
                        c => out.push(c),
                    }
                }
            }
            '\'' => {
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    out.push(c);
                }
            }
            '\\' => {
                if let Some(e) = chars.next() {
                    out.push(e);
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::inspect::test_images;

    #[test]
    fn os_release_quoting() {
        let m = parse_os_release(
            "# comment\nA=plain\nB=\"double \\\"q\\\" \\$x\"\nC='single $x'\n\nD=\"\"\nE=es\\ caped\nbad line\n",
        );
        assert_eq!(m["A"], "plain");
        assert_eq!(m["B"], "double \"q\" $x");
        assert_eq!(m["C"], "single $x");
        assert_eq!(m["D"], "");
        assert_eq!(m["E"], "es caped");
        assert_eq!(m.len(), 5);
        let jammy = parse_os_release(test_images::OS_RELEASE);
        assert_eq!(jammy["PRETTY_NAME"], "Ubuntu 22.04.4 LTS");
        assert_eq!(jammy["VERSION_CODENAME"], "jammy");
    }
}
