//! Module signing with the user's key (`kiln build --module-signing-key KEY
//! --module-signing-cert CERT`): DKMS signs every module it builds in the image, and the
//! private key never stays in the image, the work directory or the cache.
//!
//! Both Ubuntu DKMS releases sign with `kmodsign` and the Machine Owner Key in
//! `/var/lib/shim-signed/mok/` (`MOK.priv`, PEM, and `MOK.der`): jammy's dkms 2.8.7
//! (`sign_build`) when that directory exists, noble's dkms 3.0.11 (`prepare_signing`)
//! when no `mok_signing_key` is configured — its upstream default,
//! `/var/lib/dkms/mok.key` + `mok.pub`, applies to non-Ubuntu systems only. So one place
//! serves both: [`PlacedKey::place`] writes the key (mode 0600) and the certificate
//! there before any stage installs packages (whose postinst may run `dkms autoinstall`)
//! and before kiln builds the modules; [`PlacedKey::remove`] — or its `Drop`, on an
//! error or a cancelled build — deletes the key and checks that it is gone. The
//! certificate stays, for `mokutil --import /var/lib/shim-signed/mok/MOK.der`. The key
//! only ever lives in memory and in the mounted image, whose freed blocks the build's
//! fstrim discards; the DKMS cache key holds the certificate's sha256, never the key.
//!
//! [`SigningKey::load`] checks up front that the certificate is for the key (the RSA
//! public key in the certificate is the key's), with RustCrypto's `rsa`, `pkcs8` and
//! `x509-cert`: no OpenSSL on the build host, and any key format kmodsign would read
//! (PKCS#8 or PKCS#1, PEM or DER) is normalised to the PKCS#8 PEM it reads.

use crate::host::rootdir::RootDir;
use crate::image::modsig;
use anyhow::{Context, Result, bail};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, LineEnding};
use rsa::{RsaPrivateKey, RsaPublicKey};
use std::path::{Path, PathBuf};
use x509_cert::der::Encode;
use x509_cert::der::zeroize::Zeroizing;

/// Where Ubuntu's DKMS (2.8 and 3.0) finds the Machine Owner Key.
pub const MOK_DIR: &str = "/var/lib/shim-signed/mok";
pub const MOK_KEY: &str = "/var/lib/shim-signed/mok/MOK.priv";
pub const MOK_CERT: &str = "/var/lib/shim-signed/mok/MOK.der";
/// Upstream DKMS 3's default key pair (used where the distribution is not Ubuntu, or
/// when `/etc/dkms/framework.conf` points there); kiln never leaves a key there either.
pub const DKMS3_KEY: &str = "/var/lib/dkms/mok.key";
pub const DKMS3_CERT: &str = "/var/lib/dkms/mok.pub";

/// The user's module signing key and certificate, checked to belong together.
#[derive(Clone)]
pub struct SigningKey {
    pub key_path: PathBuf,
    pub cert_path: PathBuf,
    /// The private key as PKCS#8 PEM (what kmodsign reads); zeroed when dropped.
    key_pem: Zeroizing<String>,
    /// The certificate, DER (`MOK.der`).
    pub cert_der: Vec<u8>,
    /// What `modinfo -F signer` says for modules signed with it (the issuer's CN).
    pub signer: Option<String>,
    /// Its serial number (`modinfo -F sig_key`).
    pub serial: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_path", &self.key_path)
            .field("cert_path", &self.cert_path)
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Read and check `key` and `cert`; every problem is a user error naming the files.
    pub fn load(key: &Path, cert: &Path) -> Result<SigningKey> {
        let both = || {
            format!(
                "--module-signing-key {} --module-signing-cert {}",
                key.display(),
                cert.display()
            )
        };
        let key_bytes =
            Zeroizing::new(std::fs::read(key).map_err(|e| {
                crate::error::user(format!("cannot read the module signing key {}: {e}", key.display()))
            })?);
        let cert_bytes = std::fs::read(cert).map_err(|e| {
            crate::error::user(format!(
                "cannot read the module signing certificate {}: {e}",
                cert.display()
            ))
        })?;
        let private = parse_rsa_key(&key_bytes).map_err(|why| {
            crate::error::user(format!(
                "module signing key {}: {why}; give an unencrypted RSA private key (PKCS#8 or PKCS#1, PEM or DER), e.g. from `openssl req -new -x509 -newkey rsa:2048 -nodes -keyout MOK.priv -outform DER -out MOK.der -subj '/CN=NAME/'`",
                key.display()
            ))
        })?;
        let (certificate, cert_der) = modsig::certificate_der(&cert_bytes).map_err(|why| {
            crate::error::user(format!(
                "module signing certificate {}: {why}; give an X.509 certificate, DER or PEM",
                cert.display()
            ))
        })?;
        let spki = certificate
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .context("encoding the certificate's public key")?;
        let matches = RsaPublicKey::from_public_key_der(&spki).is_ok_and(|p| p == private.to_public_key());
        if !matches {
            crate::user_bail!(
                "{}: the certificate is not for the key (its public key is not the key's); give the certificate made from this key",
                both()
            );
        }
        let key_pem = private
            .to_pkcs8_pem(LineEnding::LF)
            .context("encoding the module signing key as PEM")?;
        let (signer, serial) = modsig::signer_of_certificate(&certificate);
        Ok(SigningKey {
            key_path: key.to_path_buf(),
            cert_path: cert.to_path_buf(),
            key_pem,
            cert_der,
            signer,
            serial,
        })
    }
}

/// An unencrypted RSA private key: PKCS#8 or PKCS#1, PEM or DER.
fn parse_rsa_key(bytes: &[u8]) -> std::result::Result<RsaPrivateKey, String> {
    let text = std::str::from_utf8(bytes).ok().map(str::trim);
    match text {
        Some(t) if t.starts_with("-----BEGIN") => {
            if t.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY") || t.contains("Proc-Type: 4,ENCRYPTED") {
                return Err("the key is encrypted (kmodsign in the image cannot ask for its passphrase)".into());
            }
            if t.starts_with("-----BEGIN RSA PRIVATE KEY") {
                RsaPrivateKey::from_pkcs1_pem(t).map_err(|e| format!("not a PKCS#1 RSA private key ({e})"))
            } else if t.starts_with("-----BEGIN PRIVATE KEY") {
                RsaPrivateKey::from_pkcs8_pem(t).map_err(|e| format!("not an RSA private key ({e})"))
            } else {
                Err(format!(
                    "PEM block `{}` is not a private key",
                    t.lines().next().unwrap_or_default()
                ))
            }
        }
        _ => RsaPrivateKey::from_pkcs8_der(bytes)
            .or_else(|_| RsaPrivateKey::from_pkcs1_der(bytes))
            .map_err(|_| "not an RSA private key in PEM or DER".to_string()),
    }
}

/// The key and certificate placed in the image, for DKMS; the key is removed by
/// [`PlacedKey::remove`], or when dropped.
pub struct PlacedKey<'a> {
    rd: &'a RootDir,
    key_placed: bool,
}

impl<'a> PlacedKey<'a> {
    pub fn place(rd: &'a RootDir, key: &SigningKey) -> Result<PlacedKey<'a>> {
        if !rd.is_dir(MOK_DIR)? {
            rd.create_dir_all(MOK_DIR, 0o700)?;
        }
        rd.write_file(MOK_CERT, &key.cert_der, 0o644)?;
        let mut placed = PlacedKey { rd, key_placed: true };
        let written = (|| -> Result<()> {
            use std::io::Write;
            let mut f = rd.create_file(MOK_KEY, 0o600)?;
            f.write_all(key.key_pem.as_bytes())
                .with_context(|| format!("writing {}", rd.describe(MOK_KEY)))?;
            Ok(())
        })();
        if let Err(e) = written {
            placed.remove_key()?;
            return Err(e);
        }
        tracing::info!(
            "module signing: key and certificate ({}) in {MOK_DIR} while DKMS builds",
            key.signer.as_deref().unwrap_or("no CN")
        );
        Ok(placed)
    }

    /// Delete the private key from the image and check that it is gone.
    pub fn remove(mut self) -> Result<()> {
        self.remove_key()
    }

    fn remove_key(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.key_placed) {
            return Ok(());
        }
        if self.rd.lstat(MOK_KEY)?.is_some() {
            self.rd.remove_file(MOK_KEY)?;
        }
        if self.rd.lstat(MOK_KEY)?.is_some() {
            bail!(
                "the module signing key {} is still in the image after removing it",
                self.rd.describe(MOK_KEY)
            );
        }
        tracing::info!("module signing: key removed from the image ({MOK_KEY})");
        Ok(())
    }
}

impl Drop for PlacedKey<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.remove_key() {
            tracing::error!("{e:#}");
        }
    }
}

/// Every module DKMS installed (`/lib/modules/K/updates/dkms/*.ko`) must carry a
/// signature by `key`; the list of those that do not, with why.
pub fn unsigned_modules(rd: &RootDir, key: &SigningKey) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    for k in crate::image::kernels::bootable_kernels(rd)? {
        let dir = format!("/lib/modules/{k}/updates/dkms");
        if !rd.is_dir(&dir)? {
            continue;
        }
        for name in rd.read_dir(&dir)? {
            let path = format!("{dir}/{name}");
            if !name.ends_with(".ko") && !name.contains(".ko.") {
                continue;
            }
            let bytes = crate::image::verify::decompress_module(&name, rd.read(&path)?);
            let why = match bytes.map(|b| modsig::read(&b)) {
                Err(why) | Ok(Err(why)) => Some(why),
                Ok(Ok(None)) => Some("not signed".to_string()),
                Ok(Ok(Some(s))) if s.signer != key.signer || s.key != key.serial => Some(format!(
                    "signed by {} (key {}), not by the given certificate",
                    s.signer.as_deref().unwrap_or("?"),
                    s.key
                )),
                Ok(Ok(Some(_))) => None,
            };
            if let Some(why) = why {
                bad.push(format!("{path}: {why}"));
            }
        }
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::cmd::Cmd;
    use crate::image::modsig::testkeys;

    /// A key and its certificate load (PEM or DER certificate, PKCS#8 or PKCS#1 key); a
    /// certificate of another key, an encrypted key or a certificate as key is a user
    /// error (exit 2) naming the files.
    #[test]
    fn key_and_certificate_must_match() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = testkeys::make(dir.path(), "Signer A");
        let (other_key, other_cert) = testkeys::make(dir.path(), "Signer B");
        let k = SigningKey::load(&key, &cert).unwrap();
        assert_eq!(k.signer.as_deref(), Some("Signer A"));
        assert_eq!(k.cert_der, std::fs::read(&cert).unwrap());
        assert!(k.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(!format!("{k:?}").contains("PRIVATE"), "Debug must not show the key");

        let cert_pem = dir.path().join("a.crt");
        let pkcs1 = dir.path().join("a.rsa");
        Cmd::new("openssl")
            .args(["x509", "-inform", "DER", "-in"])
            .arg(&cert)
            .arg("-out")
            .arg(&cert_pem)
            .run()
            .unwrap();
        Cmd::new("openssl")
            .args(["rsa", "-traditional", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&pkcs1)
            .run()
            .unwrap();
        let k2 = SigningKey::load(&pkcs1, &cert_pem).unwrap();
        assert_eq!(k2.cert_der, k.cert_der, "a PEM certificate is stored as DER");
        assert_eq!(*k2.key_pem, *k.key_pem);

        let enc = dir.path().join("enc.pem");
        Cmd::new("openssl")
            .args(["pkcs8", "-topk8", "-passout", "pass:secret12", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&enc)
            .run()
            .unwrap();
        for (k, c, want) in [
            (&key, &other_cert, "the certificate is not for the key"),
            (&other_key, &cert, "the certificate is not for the key"),
            (&enc, &cert, "encrypted"),
            (&cert, &cert, "not an RSA private key"),
            (&key, &key, "not a CERTIFICATE"),
        ] {
            let e = SigningKey::load(k, c).unwrap_err();
            assert_eq!(crate::error::exit_code(&e), 2, "{e:#}");
            let msg = format!("{e:#}");
            assert!(msg.contains(want), "{msg}");
            assert!(
                msg.contains(&k.display().to_string()) || msg.contains(&c.display().to_string()),
                "{msg}"
            );
        }
        let e = SigningKey::load(&key, &other_cert).unwrap_err().to_string();
        assert!(
            e.contains(&key.display().to_string()) && e.contains(&other_cert.display().to_string()),
            "{e}"
        );
    }

    /// The key is in the image (0600) only until removed or dropped; the certificate stays.
    #[test]
    fn placed_key_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = testkeys::make(dir.path(), "Signer A");
        let k = SigningKey::load(&key, &cert).unwrap();
        let image = tempfile::tempdir().unwrap();
        let rd = RootDir::open(image.path()).unwrap();
        let placed = PlacedKey::place(&rd, &k).unwrap();
        assert_eq!(rd.symlink_metadata(MOK_KEY).unwrap().mode() & 0o777, 0o600);
        assert_eq!(rd.read(MOK_KEY).unwrap(), k.key_pem.as_bytes());
        placed.remove().unwrap();
        assert!(rd.lstat(MOK_KEY).unwrap().is_none());
        assert_eq!(rd.read(MOK_CERT).unwrap(), k.cert_der);
        // On an error path the guard's drop removes it.
        {
            let _placed = PlacedKey::place(&rd, &k).unwrap();
            assert!(rd.exists(MOK_KEY).unwrap());
        }
        assert!(rd.lstat(MOK_KEY).unwrap().is_none());
    }

    /// Modules under updates/dkms must be signed by the given certificate.
    #[test]
    fn unsigned_modules_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = testkeys::make(dir.path(), "Signer A");
        let (other_key, other_cert) = testkeys::make(dir.path(), "Signer B");
        let k = SigningKey::load(&key, &cert).unwrap();
        let image = tempfile::tempdir().unwrap();
        let rd = RootDir::open(image.path()).unwrap();
        let kernel = "5.15.0-1-generic";
        rd.create_dir_all(format!("/lib/modules/{kernel}/updates/dkms"), 0o755)
            .unwrap();
        rd.create_dir_all("/boot", 0o755).unwrap();
        rd.write_file(format!("/boot/vmlinuz-{kernel}"), b"kernel", 0o644)
            .unwrap();
        let m = b"\x7fELF module".to_vec();
        let dkms = format!("/lib/modules/{kernel}/updates/dkms");
        rd.write_file(
            format!("{dkms}/good.ko"),
            &testkeys::sign(dir.path(), &m, &key, &cert),
            0o644,
        )
        .unwrap();
        rd.write_file(format!("{dkms}/plain.ko"), &m, 0o644).unwrap();
        rd.write_file(
            format!("{dkms}/other.ko"),
            &testkeys::sign(dir.path(), &m, &other_key, &other_cert),
            0o644,
        )
        .unwrap();
        let bad = unsigned_modules(&rd, &k).unwrap();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad.iter().any(|b| b.contains("plain.ko: not signed")), "{bad:?}");
        assert!(
            bad.iter().any(|b| b.contains("other.ko: signed by Signer B")),
            "{bad:?}"
        );
    }
}
