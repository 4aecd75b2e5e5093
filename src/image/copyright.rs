//! The declared license of a Debian package, from its machine-readable
//! `/usr/share/doc/PKG/copyright` (DEP-5), as an SPDX license expression.
//!
//! The file is parsed by the `debian-copyright` crate (paragraphs and DEP-5 license
//! expressions: `or`, `and`, `with`, comma precedence). Each Debian short name is mapped
//! to an SPDX license list identifier checked against the `spdx` crate's list:
//! `GPL-2+` → `GPL-2.0-or-later`, `LGPL-2.1` → `LGPL-2.1-only`, `Expat` → `MIT`,
//! `BSD-3-clause` → `BSD-3-Clause`, `Apache-2` → `Apache-2.0`, `Perl` → `Artistic-1.0-Perl OR
//! GPL-1.0-or-later`, ... A name with no SPDX identifier (`public-domain`, a
//! project's own license, `X+` of a non-GNU license, whose `ID+` form validators reject)
//! becomes a `LicenseRef-` carrying the license text the copyright file gives for it;
//! without a text the package's license is `NOASSERTION`.
//! The package's declared license is the conjunction (`AND`) of the distinct licenses
//! of its `Files` paragraphs. The result is checked with the `spdx` crate's strict
//! parser, so whatever is returned is a valid SPDX expression.

use debian_copyright::LicenseExpr;
use debian_copyright::lossless::Copyright;
use sha2::{Digest, Sha256};

/// A license without an SPDX identifier, with the text the copyright file gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedLicense {
    /// `LicenseRef-NAME-HASH`: the sanitised Debian name and a short hash of the text, so
    /// one name with different texts in different packages gets different ids.
    pub id: String,
    /// The Debian short name, as written.
    pub name: String,
    pub text: String,
}

/// A package's declared license.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredLicense {
    /// A valid SPDX license expression.
    pub expression: String,
    /// The `LicenseRef-`s the expression uses.
    pub extracted: Vec<ExtractedLicense>,
}

/// The declared license of a package whose copyright file reads `text`; none if the file
/// is not machine-readable (no `Format:` header) or a license can't be expressed.
pub fn declared_license(text: &str) -> Option<DeclaredLicense> {
    if !text.trim_start().starts_with("Format:") {
        return None;
    }
    let (copyright, _errors) = Copyright::from_str_relaxed(text).ok()?;
    let mut extracted = Vec::new();
    let mut terms: Vec<String> = Vec::new();
    for files in copyright.iter_files() {
        let Some(license) = files.license() else { continue };
        let Some(expr) = license.expr() else { continue };
        // A Files paragraph may carry the text itself (`License: NAME` + body).
        let text_of = |name: &str| -> Option<String> {
            let named = |l: &debian_copyright::License| l.text().map(str::to_string).filter(|t| !t.trim().is_empty());
            if license.name().is_some_and(|n| n.trim() == name)
                && let Some(t) = named(&license)
            {
                return Some(t);
            }
            copyright.find_license_by_name(name).as_ref().and_then(named)
        };
        let term = to_spdx(&expr, &text_of, &mut extracted)?;
        if !terms.contains(&term) {
            terms.push(term);
        }
    }
    if terms.is_empty() {
        return None;
    }
    let expression = if terms.len() == 1 {
        terms.pop().expect("one term")
    } else {
        terms.iter().map(|t| parenthesise(t)).collect::<Vec<_>>().join(" AND ")
    };
    spdx::Expression::parse_mode(&expression, spdx::ParseMode::STRICT).ok()?;
    extracted.retain(|e: &ExtractedLicense| expression.contains(&e.id));
    Some(DeclaredLicense { expression, extracted })
}

/// An SPDX expression for a DEP-5 expression; none if a license has neither an SPDX
/// identifier nor a text.
fn to_spdx(
    expr: &LicenseExpr,
    text_of: &dyn Fn(&str) -> Option<String>,
    extracted: &mut Vec<ExtractedLicense>,
) -> Option<String> {
    let join = |items: &[LicenseExpr], op: &str, extracted: &mut Vec<ExtractedLicense>| -> Option<String> {
        let parts: Option<Vec<String>> = items
            .iter()
            .map(|e| to_spdx(e, text_of, extracted).map(|s| parenthesise(&s)))
            .collect();
        Some(parts?.join(op))
    };
    match expr {
        LicenseExpr::Name(name) => spdx_id(name).or_else(|| license_ref(name, text_of(name)?, extracted)),
        LicenseExpr::WithException(name, exception) => {
            let whole = format!("{name} with {exception}");
            match (spdx_id(name), exception_id(exception)) {
                (Some(l), Some(x)) if !l.contains(' ') => Some(format!("{l} WITH {x}")),
                _ => {
                    let text = text_of(&whole).or_else(|| text_of(name))?;
                    license_ref(&whole, text, extracted)
                }
            }
        }
        LicenseExpr::And(items) => join(items, " AND ", extracted),
        LicenseExpr::Or(items) => join(items, " OR ", extracted),
    }
}

/// `(a OR b)` for a compound expression, as it is for a single term.
fn parenthesise(s: &str) -> String {
    if s.contains(' ') && !(s.starts_with('(') && s.ends_with(')')) {
        format!("({s})")
    } else {
        s.to_string()
    }
}

/// A `LicenseRef-` for a license with no SPDX identifier, recorded in `extracted`.
fn license_ref(name: &str, text: String, extracted: &mut Vec<ExtractedLicense>) -> Option<String> {
    let mut clean: String = name
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' })
        .collect();
    while clean.contains("--") {
        clean = clean.replace("--", "-");
    }
    let clean = clean.trim_matches('-');
    let hash = crate::disk::checksum::hex(&Sha256::digest(text.as_bytes()).into());
    let id = format!(
        "LicenseRef-{}-{}",
        if clean.is_empty() { "unnamed" } else { clean },
        &hash[..8]
    );
    if !extracted.iter().any(|e| e.id == id) {
        extracted.push(ExtractedLicense {
            id: id.clone(),
            name: name.trim().to_string(),
            text,
        });
    }
    Some(id)
}

/// The SPDX identifier (or, for `Perl`, expression) of a Debian short license name.
pub fn spdx_id(debian: &str) -> Option<String> {
    let name = debian.trim();
    let (base, or_later) = match name.strip_suffix('+') {
        Some(b) => (b.trim(), true),
        None => (name, false),
    };
    let lower = base.to_ascii_lowercase();
    // DEP-5 names that differ from SPDX's.
    let renamed = match lower.as_str() {
        "expat" => Some("MIT"),
        "perl" => return Some("Artistic-1.0-Perl OR GPL-1.0-or-later".into()),
        "artistic" | "artistic-1" => Some("Artistic-1.0"),
        "zope" => Some("ZPL-2.1"),
        "public-domain" => return None,
        _ => None,
    };
    // The GNU licenses: -only or -or-later, never the deprecated bare id.
    for (family, spdx_family) in [
        ("gfdl-niv-", "GFDL-"),
        ("agpl-", "AGPL-"),
        ("lgpl-", "LGPL-"),
        ("gpl-", "GPL-"),
        ("gfdl-", "GFDL-"),
    ] {
        if let Some(version) = lower.strip_prefix(family) {
            let version = if version.contains('.') {
                version.to_string()
            } else {
                format!("{version}.0")
            };
            let niv = if family == "gfdl-niv-" { "-no-invariants" } else { "" };
            let suffix = if or_later { "-or-later" } else { "-only" };
            let id = format!("{spdx_family}{version}{niv}{suffix}");
            return known(&id);
        }
    }
    if matches!(lower.as_str(), "gpl" | "lgpl" | "agpl" | "gfdl") {
        // No version: any version (GPL-1.0-or-later) is what the name allows.
        return known(&format!("{}-1.0-or-later", base.to_ascii_uppercase()));
    }
    if or_later {
        // SPDX's `ID+` is valid syntax, but validators (the SPDX project's own among them)
        // know it only for a few ids; such a license gets a LicenseRef with its text.
        return None;
    }
    let candidates = [
        renamed.map(str::to_string),
        Some(base.to_string()),
        Some(format!("{base}.0")),
        Some(base.replace("clause", "Clause")),
    ];
    candidates.into_iter().flatten().find_map(|c| known(&c))
}

/// `id` as spelled in the SPDX license list (matched without regard to case), if it is
/// there and not deprecated.
fn known(id: &str) -> Option<String> {
    spdx::identifiers::LICENSES
        .iter()
        .find(|l| l.name.eq_ignore_ascii_case(id))
        .and_then(|l| spdx::license_id(l.name))
        .filter(|l| !l.is_deprecated())
        .map(|l| l.name.to_string())
}

/// The SPDX exception identifier of a DEP-5 exception name (`OpenSSL-exception`,
/// `Classpath exception`, `GCC-exception-3.1`, `Font exception`).
fn exception_id(name: &str) -> Option<String> {
    let dashed = name.trim().replace(' ', "-");
    let with_suffix = if dashed.to_ascii_lowercase().contains("exception") {
        dashed.clone()
    } else {
        format!("{dashed}-exception")
    };
    [dashed.clone(), with_suffix.clone(), format!("{with_suffix}-2.0")]
        .iter()
        .find_map(|c| {
            spdx::identifiers::EXCEPTIONS
                .iter()
                .find(|e| e.name.eq_ignore_ascii_case(c))
                .map(|e| e.name.to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_names_map_to_spdx_ids() {
        for (debian, spdx) in [
            ("GPL-2+", "GPL-2.0-or-later"),
            ("GPL-2", "GPL-2.0-only"),
            ("GPL-3.0+", "GPL-3.0-or-later"),
            ("LGPL-2.1+", "LGPL-2.1-or-later"),
            ("LGPL-2", "LGPL-2.0-only"),
            ("AGPL-3+", "AGPL-3.0-or-later"),
            ("GFDL-NIV-1.3+", "GFDL-1.3-no-invariants-or-later"),
            ("GPL", "GPL-1.0-or-later"),
            ("Expat", "MIT"),
            ("MIT", "MIT"),
            ("BSD-3-clause", "BSD-3-Clause"),
            ("bsd-2-clause", "BSD-2-Clause"),
            ("Apache-2", "Apache-2.0"),
            ("Apache-2.0", "Apache-2.0"),
            ("ISC", "ISC"),
            ("Zlib", "Zlib"),
            ("MPL-2.0", "MPL-2.0"),
            ("CC0-1.0", "CC0-1.0"),
            ("CC-BY-SA-3.0", "CC-BY-SA-3.0"),
            ("Artistic", "Artistic-1.0"),
            ("Artistic-2.0", "Artistic-2.0"),
            ("Perl", "Artistic-1.0-Perl OR GPL-1.0-or-later"),
        ] {
            assert_eq!(spdx_id(debian).as_deref(), Some(spdx), "{debian}");
        }
        for unmappable in ["public-domain", "LGPL-9", "permissive", "other", "MPL-1.1+"] {
            assert_eq!(spdx_id(unmappable), None, "{unmappable}");
        }
        assert_eq!(exception_id("OpenSSL-exception"), None, "not on the SPDX list");
        assert_eq!(
            exception_id("Classpath-exception").as_deref(),
            Some("Classpath-exception-2.0")
        );
        assert_eq!(exception_id("GCC-exception-3.1").as_deref(), Some("GCC-exception-3.1"));
    }

    const DEP5: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: example

Files: *
Copyright: 2001 Someone
License: GPL-2+

Files: lib/*
Copyright: 2002 Other
License: LGPL-2.1+ or BSD-3-clause

Files: doc/*
Copyright: nobody
License: public-domain
 The author places this work in the public domain.

Files: gpl/*
Copyright: 2003 X
License: GPL-2+

Files: ext/*
Copyright: 2004 Y
License: GPL-2+ with Classpath-exception

License: GPL-2+
 This program is free software; you can redistribute it ...
";

    #[test]
    fn dep5_declared_license() {
        let d = declared_license(DEP5).unwrap();
        let pd = &d.extracted[0].id;
        assert!(pd.starts_with("LicenseRef-public-domain-") && pd.len() == "LicenseRef-public-domain-".len() + 8);
        assert_eq!(
            d.expression,
            format!(
                "GPL-2.0-or-later AND (LGPL-2.1-or-later OR BSD-3-Clause) AND {pd} AND (GPL-2.0-or-later WITH Classpath-exception-2.0)"
            )
        );
        assert_eq!(d.extracted.len(), 1);
        assert_eq!(d.extracted[0].name, "public-domain");
        assert_eq!(d.extracted[0].text, "The author places this work in the public domain.");
    }

    #[test]
    fn unknown_without_text_or_free_form_is_none() {
        assert_eq!(
            declared_license("This package was debianized by ...\n\nGPL-2, see /usr/share/common-licenses"),
            None
        );
        let no_text = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\nCopyright: x\nLicense: custom\n";
        assert_eq!(declared_license(no_text), None);
        let with_text = format!("{no_text}\nLicense: custom\n You may do anything.\n .\n Really.\n");
        let d = declared_license(&with_text).unwrap();
        assert!(d.expression.starts_with("LicenseRef-custom-"), "{d:?}");
        assert_eq!(d.extracted[0].text, "You may do anything.\n\nReally.");
    }
}
