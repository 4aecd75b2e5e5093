//! A kernel module's appended signature, read offline: who signed a `.ko` file, as
//! `modinfo -F signer` says it.
//!
//! `scripts/sign-file` (and Ubuntu's `kmodsign`, which DKMS uses) appends to the module
//!
//! ```text
//! [ module ][ signer ][ key id ][ signature ][ struct module_signature ][ "~Module signature appended~\n" ]
//! ```
//!
//! where `struct module_signature` is `{u8 algo, hash, id_type, signer_len, key_id_len;
//! u8 pad[3]; __be32 sig_len}`. With `id_type` 2 (PKCS#7, what every current signer
//! writes) the signer and key id are empty and the signature is a CMS `SignedData`
//! (parsed with RustCrypto's `cms`). The signer is derived as kmod's
//! `libkmod-signature.c` (`fill_pkcs7`, `x509_name_to_str`) derives it: the first
//! `SignerInfo`'s issuer-and-serial identifier, the value of the issuer name's first
//! commonName attribute — or, kmod's quirk, of its last attribute when it has no CN;
//! the key is the serial number in upper-case hex pairs joined by `:`. For the
//! self-signed certificates Machine Owner Keys are, the issuer is the subject: the
//! signer is the certificate's own CN.

use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerIdentifier};
use serde::Serialize;
use x509_cert::Certificate;
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::der::{Decode, Encode};
use x509_cert::name::Name;

const MAGIC: &[u8] = b"~Module signature appended~\n";
/// `sizeof(struct module_signature)`.
const INFO_LEN: usize = 12;
/// `module_signature.id_type` for a PKCS#7 (CMS) signature.
const PKEY_ID_PKCS7: u8 = 2;
const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

/// A module's appended signature, as `modinfo` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Signature {
    /// `modinfo -F signer`; `None` when the signature names none.
    pub signer: Option<String>,
    /// `modinfo -F sig_key`: the signing certificate's serial number (PKCS#7) or the
    /// key id, `AB:CD:...`.
    pub key: String,
    /// `modinfo -F sig_hashalgo` (`sha512`, ...).
    pub hash: String,
}

/// The signature appended to `module` (an uncompressed `.ko`): `Ok(None)` when it has
/// none, an error saying what is wrong when the trailer is there but unreadable.
pub fn read(module: &[u8]) -> Result<Option<Signature>, String> {
    let Some(body) = module.strip_suffix(MAGIC) else {
        return Ok(None);
    };
    let info_at = body
        .len()
        .checked_sub(INFO_LEN)
        .ok_or("signature trailer without its module_signature header")?;
    let info = &body[info_at..];
    let (hash, id_type, signer_len, key_id_len) = (info[1], info[2], info[3] as usize, info[4] as usize);
    let sig_len = u32::from_be_bytes(info[8..12].try_into().unwrap()) as usize;
    let rest = &body[..info_at];
    let sig_at = rest
        .len()
        .checked_sub(sig_len)
        .ok_or("signature length exceeds the file")?;
    let sig = &rest[sig_at..];
    if id_type == PKEY_ID_PKCS7 {
        return pkcs7(sig).map(Some);
    }
    // Older formats name the signer and key id in the trailer itself.
    let key_at = sig_at.checked_sub(key_id_len).ok_or("key id length exceeds the file")?;
    let signer_at = key_at.checked_sub(signer_len).ok_or("signer length exceeds the file")?;
    let signer = c_string(&rest[signer_at..key_at]);
    Ok(Some(Signature {
        signer: (!signer.is_empty()).then_some(signer),
        key: hex_pairs(&rest[key_at..sig_at]),
        hash: HASHES
            .get(hash as usize)
            .map_or_else(|| format!("unknown ({hash})"), |h| h.to_string()),
    }))
}

/// The kernel's `enum hash_algo` names (`module_signature.hash` for non-PKCS#7 signatures).
const HASHES: [&str; 10] = [
    "md4",
    "md5",
    "sha1",
    "rmd160",
    "sha256",
    "sha384",
    "sha512",
    "sha224",
    "sm3",
    "streebog256",
];

fn pkcs7(sig: &[u8]) -> Result<Signature, String> {
    let ci = ContentInfo::from_der(sig).map_err(|e| format!("PKCS#7 signature does not parse ({e})"))?;
    if ci.content_type != ID_SIGNED_DATA {
        return Err(format!("PKCS#7 signature is {}, not SignedData", ci.content_type));
    }
    let sd: SignedData = ci
        .content
        .decode_as()
        .map_err(|e| format!("PKCS#7 SignedData does not parse ({e})"))?;
    let si = sd
        .signer_infos
        .0
        .iter()
        .next()
        .ok_or("PKCS#7 signature has no signer")?;
    let SignerIdentifier::IssuerAndSerialNumber(ias) = &si.sid else {
        return Err("PKCS#7 signer is named by a subject key identifier, not issuer and serial".into());
    };
    Ok(Signature {
        signer: common_name(&ias.issuer),
        key: hex_pairs(ias.serial_number.as_bytes()),
        hash: hash_name(&si.digest_alg.oid),
    })
}

/// kmod's `x509_name_to_str`: the first commonName value of `name` (its last
/// attribute's value when it has no commonName).
pub fn common_name(name: &Name) -> Option<String> {
    let mut last = None;
    for atv in name.0.iter().flat_map(|rdn| rdn.0.iter()) {
        last = Some(atv);
        if atv.oid == COMMON_NAME {
            break;
        }
    }
    last.map(|atv| c_string(atv.value.value()))
}

/// The signer `modinfo` reports for modules signed with the certificate `cert_der`:
/// its issuer's CN (what `sign-file` records), and the serial number.
pub fn signer_of_certificate(cert: &Certificate) -> (Option<String>, String) {
    let tbs = &cert.tbs_certificate;
    (common_name(&tbs.issuer), hex_pairs(tbs.serial_number.as_bytes()))
}

/// A certificate in DER, or PEM (`-----BEGIN CERTIFICATE-----`): the DER bytes.
pub fn certificate_der(bytes: &[u8]) -> Result<(Certificate, Vec<u8>), String> {
    let der = if bytes.starts_with(b"-----BEGIN") || bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        let text = std::str::from_utf8(bytes).map_err(|_| "PEM file is not text".to_string())?;
        let (label, der) = x509_cert::der::pem::decode_vec(text.trim().as_bytes())
            .map_err(|e| format!("PEM does not decode ({e})"))?;
        if label != "CERTIFICATE" {
            return Err(format!("PEM holds a {label}, not a CERTIFICATE"));
        }
        der
    } else {
        bytes.to_vec()
    };
    let cert = Certificate::from_der(&der).map_err(|e| format!("not an X.509 certificate ({e})"))?;
    // Store exactly one certificate's encoding (no trailing bytes).
    let der = cert
        .to_der()
        .map_err(|e| format!("re-encoding the certificate ({e})"))?;
    Ok((cert, der))
}

fn hash_name(oid: &ObjectIdentifier) -> String {
    match oid.to_string().as_str() {
        "1.3.14.3.2.26" => "sha1",
        "2.16.840.1.101.3.4.2.1" => "sha256",
        "2.16.840.1.101.3.4.2.2" => "sha384",
        "2.16.840.1.101.3.4.2.3" => "sha512",
        "2.16.840.1.101.3.4.2.4" => "sha224",
        other => return other.to_string(),
    }
    .to_string()
}

/// Bytes up to the first NUL, as text (kmod prints C strings).
fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// `AB:CD:EF`, as `modinfo` prints key ids and serial numbers.
fn hex_pairs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect::<Vec<_>>().join(":")
}

/// Test support: an RSA key (`key.pem`, PKCS#8) and its self-signed certificate
/// (`cert.der`) with common name `cn`, made with the openssl CLI; and `module` signed
/// with them as `scripts/sign-file` signs (detached CMS, issuer and serial, no
/// certificates, no attributes), trailer appended.
#[cfg(test)]
pub(crate) mod testkeys {
    use crate::host::cmd::Cmd;
    use std::path::{Path, PathBuf};

    pub fn make(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
        let (key, cert) = (dir.join(format!("{cn}.pem")), dir.join(format!("{cn}.der")));
        Cmd::new("openssl")
            .args([
                "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-outform", "DER",
            ])
            .arg("-subj")
            .arg(format!("/O=kiln tests/CN={cn}/"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .run()
            .expect("openssl req (the openssl CLI is needed by the unit tests)");
        (key, cert)
    }

    pub fn sign(dir: &Path, module: &[u8], key: &Path, cert: &Path) -> Vec<u8> {
        let (m, pem, sig) = (dir.join("m.ko"), dir.join("cert.pem"), dir.join("m.p7s"));
        std::fs::write(&m, module).unwrap();
        Cmd::new("openssl")
            .args(["x509", "-inform", "DER", "-in"])
            .arg(cert)
            .arg("-out")
            .arg(&pem)
            .run()
            .unwrap();
        Cmd::new("openssl")
            .args([
                "cms",
                "-sign",
                "-binary",
                "-noattr",
                "-nocerts",
                "-nosmimecap",
                "-md",
                "sha512",
                "-outform",
                "DER",
            ])
            .arg("-in")
            .arg(&m)
            .arg("-signer")
            .arg(&pem)
            .arg("-inkey")
            .arg(key)
            .arg("-out")
            .arg(&sig)
            .run()
            .unwrap();
        let sig = std::fs::read(&sig).unwrap();
        let mut out = module.to_vec();
        out.extend_from_slice(&sig);
        out.extend_from_slice(&[0, 0, super::PKEY_ID_PKCS7, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        out.extend_from_slice(super::MAGIC);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module signed as sign-file signs it: the signer is the certificate's CN (its
    /// issuer's, self-signed), the key its serial, the hash sha512 — what `modinfo`
    /// prints; and the same as `signer_of_certificate` says for the certificate.
    #[test]
    fn pkcs7_signature_names_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = testkeys::make(dir.path(), "Test Module Signer");
        let signed = testkeys::sign(dir.path(), b"\x7fELF not really a module", &key, &cert);
        let s = read(&signed).unwrap().expect("signed");
        assert_eq!(s.signer.as_deref(), Some("Test Module Signer"));
        assert_eq!(s.hash, "sha512");
        let (c, der) = certificate_der(&std::fs::read(&cert).unwrap()).unwrap();
        assert_eq!(der, std::fs::read(&cert).unwrap());
        let (signer, serial) = signer_of_certificate(&c);
        assert_eq!(signer.as_deref(), Some("Test Module Signer"));
        assert_eq!(s.key, serial);
        assert!(serial.len() > 2 && serial.chars().all(|c| c.is_ascii_hexdigit() || c == ':'));
        // The same certificate as PEM gives the same DER.
        let pem = dir.path().join("cert.pem");
        let (_, der2) = certificate_der(&std::fs::read(pem).unwrap()).unwrap();
        assert_eq!(der2, der);
        assert!(certificate_der(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err());
        assert!(certificate_der(b"junk").is_err());
    }

    /// An unsigned module, and trailers that lie about their lengths, are told apart.
    #[test]
    fn unsigned_and_damaged_trailers() {
        assert_eq!(read(b"\x7fELF plain module"), Ok(None));
        let mut short = b"x".to_vec();
        short.extend_from_slice(MAGIC);
        assert!(read(&short).is_err());
        let mut long = vec![0u8; 20];
        long.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        long.extend_from_slice(MAGIC);
        assert!(read(&long).unwrap_err().contains("exceeds"));
        // A PKCS#7 id with garbage where the CMS should be.
        let mut junk = vec![0u8; 40];
        junk.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 8]);
        junk.extend_from_slice(MAGIC);
        assert!(read(&junk).unwrap_err().contains("does not parse"));
    }

    /// The legacy (non-PKCS#7) layout carries signer and key id in the trailer.
    #[test]
    fn legacy_trailer() {
        let mut m = b"\x7fELF module".to_vec();
        m.extend_from_slice(b"Build key");
        m.extend_from_slice(&[0xab, 0x01]);
        m.extend_from_slice(&[9, 9, 9]);
        m.extend_from_slice(&[1, 4, 1, 9, 2, 0, 0, 0, 0, 0, 0, 3]);
        m.extend_from_slice(MAGIC);
        let s = read(&m).unwrap().unwrap();
        assert_eq!(s.signer.as_deref(), Some("Build key"));
        assert_eq!(s.key, "AB:01");
        assert_eq!(s.hash, "sha256");
    }
}
