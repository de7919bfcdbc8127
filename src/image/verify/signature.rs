//! OpenPGP signatures of checksum manifests, checked with rpgp (the `pgp` crate) against a
//! keyring: detached (`SHA256SUMS.gpg`, `.asc`, `.sig`, `.sign`; armored or binary, one or
//! more signatures) or clearsigned (Fedora's `CHECKSUM`). rpgp checks the cryptography; the
//! rules that make a key usable are here: the signing key (or subkey, bound by a valid binding
//! signature with the signing flag and a back-signature) belongs to a certificate of the
//! keyring, neither is revoked, neither is expired *now* (a signature's creation time is the
//! signer's word, so "valid when it signed" proves nothing about a leaked old key), and the
//! signature uses SHA-2 or SHA-3 (MD5, SHA-1 and RIPEMD-160 are refused). A leaf of `verify/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pgp::composed::{
    CleartextSignedMessage, Deserializable, DetachedSignature, SignedPublicKey, SignedPublicSubKey,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::packet::{Signature, SignatureType};
use pgp::types::{KeyDetails, Tag, Timestamp};

/// Largest keyring file read.
const MAX_KEYRING_BYTES: u64 = 16 << 20;

/// Certificates trusted to sign manifests (`sources.trust[].keyring`), parsed once.
#[derive(Debug)]
pub(crate) struct Keyring {
    /// Where it was read from (for messages).
    pub(crate) path: PathBuf,
    certs: Vec<SignedPublicKey>,
}

/// Why a signature did not verify. The fingerprints are upper-case hex, as gpg prints them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SignatureError {
    #[error("the signature is not OpenPGP data: {0}")]
    Unreadable(String),
    #[error("no key of keyring {keyring} made the signature (issuer {issuer})")]
    UnknownKey { keyring: String, issuer: String },
    #[error("the signature does not match the manifest (key {0})")]
    Bad(String),
    #[error("the signing key {0} has expired")]
    ExpiredKey(String),
    #[error("the signing key {0} is revoked")]
    RevokedKey(String),
    #[error("the signing key {0} is not valid for signing (no valid self-signature or binding)")]
    UnusableKey(String),
    #[error("the signature uses the weak hash {0}")]
    WeakHash(String),
    #[error("the signature has expired")]
    ExpiredSignature,
}

impl SignatureError {
    /// Which error to report when no signature verified: the one that says most.
    fn rank(&self) -> u8 {
        match self {
            SignatureError::RevokedKey(_) => 7,
            SignatureError::ExpiredKey(_) => 6,
            SignatureError::Bad(_) => 5,
            SignatureError::UnusableKey(_) => 4,
            SignatureError::WeakHash(_) => 3,
            SignatureError::ExpiredSignature => 2,
            SignatureError::UnknownKey { .. } => 1,
            SignatureError::Unreadable(_) => 0,
        }
    }
}

impl Keyring {
    /// Reads a keyring: `gpg --export` output, armored or binary, one or more certificates.
    pub(crate) fn load(path: &Path) -> Result<Keyring, String> {
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
        if meta.len() > MAX_KEYRING_BYTES {
            return Err(format!("{shown}: larger than {MAX_KEYRING_BYTES} bytes"));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
        let (certs, _) = SignedPublicKey::from_reader_many(std::io::Cursor::new(bytes))
            .map_err(|e| format!("{shown}: not an OpenPGP keyring: {e}"))?;
        let certs = certs
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{shown}: not an OpenPGP keyring: {e}"))?;
        if certs.is_empty() {
            return Err(format!("{shown}: holds no public key"));
        }
        Ok(Keyring {
            path: path.to_path_buf(),
            certs,
        })
    }

    /// The certificates' fingerprints (upper-case hex).
    pub(crate) fn fingerprints(&self) -> Vec<String> {
        self.certs
            .iter()
            .map(|c| fingerprint(&c.primary_key))
            .collect()
    }

    /// Checks a detached signature file (one or more signatures) over `data`; the fingerprint
    /// of the certificate whose key made the first valid one.
    pub(crate) fn verify_detached(
        &self,
        data: &[u8],
        signature: &[u8],
        now: SystemTime,
    ) -> Result<String, SignatureError> {
        let unreadable = |e: pgp::errors::Error| SignatureError::Unreadable(e.to_string());
        let (sigs, _) =
            DetachedSignature::from_reader_many(std::io::Cursor::new(signature.to_vec()))
                .map_err(unreadable)?;
        let sigs = sigs
            .map(|s| s.map(|d| d.signature))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unreadable)?;
        self.any_valid(&sigs, data, now)
    }

    /// Checks a clearsigned manifest; the signer's fingerprint and the signed text (the only
    /// part of the file that may be read for digests).
    pub(crate) fn verify_clearsigned(
        &self,
        text: &str,
        now: SystemTime,
    ) -> Result<(String, String), SignatureError> {
        let msg = parse_clearsigned(text)?;
        let signed = msg.signed_text();
        let by = self.any_valid(msg.signatures(), signed.as_bytes(), now)?;
        Ok((by, signed))
    }

    /// The first signature that is valid over `data`, else the most telling failure.
    fn any_valid(
        &self,
        sigs: &[Signature],
        data: &[u8],
        now: SystemTime,
    ) -> Result<String, SignatureError> {
        let mut worst: Option<SignatureError> = None;
        for sig in sigs {
            match self.check(sig, data, now) {
                Ok(by) => return Ok(by),
                Err(e) if worst.as_ref().is_none_or(|w| e.rank() > w.rank()) => worst = Some(e),
                Err(_) => {}
            }
        }
        Err(worst.unwrap_or_else(|| SignatureError::Unreadable("no signature in the file".into())))
    }

    /// One signature over `data`, against every certificate it may come from.
    fn check(
        &self,
        sig: &Signature,
        data: &[u8],
        now: SystemTime,
    ) -> Result<String, SignatureError> {
        let strong = matches!(
            sig.hash_alg(),
            Some(
                HashAlgorithm::Sha224
                    | HashAlgorithm::Sha256
                    | HashAlgorithm::Sha384
                    | HashAlgorithm::Sha512
                    | HashAlgorithm::Sha3_256
                    | HashAlgorithm::Sha3_512
            )
        );
        if !strong {
            let name = sig.hash_alg().map(|h| h.to_string()).unwrap_or_default();
            return Err(SignatureError::WeakHash(name));
        }
        if let (Some(created), Some(valid_for)) = (sig.created(), sig.signature_expiration_time())
            && valid_for.as_secs() > 0
            && after(created, valid_for.as_secs(), now)
        {
            return Err(SignatureError::ExpiredSignature);
        }
        for cert in &self.certs {
            if let Some(result) = check_cert(cert, sig, data, now) {
                return result;
            }
        }
        Err(SignatureError::UnknownKey {
            keyring: self.path.display().to_string(),
            issuer: issuer_of(sig),
        })
    }
}

/// Whether `text` is a clearsigned message (`-----BEGIN PGP SIGNED MESSAGE-----` first).
pub(crate) fn is_clearsigned(text: &str) -> bool {
    text.trim_start()
        .starts_with("-----BEGIN PGP SIGNED MESSAGE-----")
}

/// The signed text of a clearsigned message, unverified (no keyring applies to its host): the
/// digests are read from the signed part only, never from around it.
pub(crate) fn clearsigned_text(text: &str) -> Result<String, SignatureError> {
    Ok(parse_clearsigned(text)?.signed_text())
}

fn parse_clearsigned(text: &str) -> Result<CleartextSignedMessage, SignatureError> {
    CleartextSignedMessage::from_string(text.trim_start())
        .map(|(msg, _)| msg)
        .map_err(|e| SignatureError::Unreadable(e.to_string()))
}

/// `Some` when a key of `cert` matches the signature's issuer: the outcome with that key.
fn check_cert(
    cert: &SignedPublicKey,
    sig: &Signature,
    data: &[u8],
    now: SystemTime,
) -> Option<Result<String, SignatureError>> {
    let primary = &cert.primary_key;
    let by = fingerprint(primary);
    if names(sig, primary) {
        return Some(match sig.verify(primary, data) {
            Err(_) => Err(SignatureError::Bad(by)),
            Ok(()) => primary_valid(cert, now).map(|()| by),
        });
    }
    let sub = cert.public_subkeys.iter().find(|s| names(sig, &s.key))?;
    let sub_fp = fingerprint(&sub.key);
    Some(match sig.verify(&sub.key, data) {
        Err(_) => Err(SignatureError::Bad(sub_fp)),
        Ok(()) => primary_valid(cert, now)
            .and_then(|()| subkey_valid(cert, sub, now))
            .map(|()| by),
    })
}

/// Whether the signature names `key` as its issuer (by fingerprint or key id).
fn names(sig: &Signature, key: &impl KeyDetails) -> bool {
    sig.issuer_fingerprint()
        .iter()
        .any(|fp| **fp == key.fingerprint())
        || sig
            .issuer_key_id()
            .iter()
            .any(|id| **id == key.legacy_key_id())
}

/// The certificate is not revoked and, by its newest valid self-signature, not expired.
fn primary_valid(cert: &SignedPublicKey, now: SystemTime) -> Result<(), SignatureError> {
    let primary = &cert.primary_key;
    let fp = fingerprint(primary);
    if cert
        .details
        .revocation_signatures
        .iter()
        .any(|s| s.verify_key(primary).is_ok())
    {
        return Err(SignatureError::RevokedKey(fp));
    }
    let user_sigs = cert.details.users.iter().flat_map(|u| {
        u.signatures
            .iter()
            .filter(|s| s.verify_certification(primary, Tag::UserId, &u.id).is_ok())
    });
    let direct = cert
        .details
        .direct_signatures
        .iter()
        .filter(|s| s.verify_key(primary).is_ok());
    let newest = user_sigs
        .chain(direct)
        .filter(|s| s.typ() != Some(SignatureType::CertRevocation))
        .max_by_key(|s| s.created().map(|t| t.as_secs()).unwrap_or(0))
        .ok_or_else(|| SignatureError::UnusableKey(fp.clone()))?;
    match newest.key_expiration_time() {
        Some(d) if d.as_secs() > 0 && after(primary.created_at(), d.as_secs(), now) => {
            Err(SignatureError::ExpiredKey(fp))
        }
        _ => Ok(()),
    }
}

/// The subkey is bound for signing (binding and back-signature valid), not revoked, and not
/// expired by its newest binding.
fn subkey_valid(
    cert: &SignedPublicKey,
    sub: &SignedPublicSubKey,
    now: SystemTime,
) -> Result<(), SignatureError> {
    let primary = &cert.primary_key;
    let fp = fingerprint(&sub.key);
    let valid = |s: &&Signature| s.verify_subkey_binding(primary, &sub.key).is_ok();
    if sub
        .signatures
        .iter()
        .filter(|s| s.typ() == Some(SignatureType::SubkeyRevocation))
        .any(|s| valid(&s))
    {
        return Err(SignatureError::RevokedKey(fp));
    }
    let binding = sub
        .signatures
        .iter()
        .filter(|s| s.typ() == Some(SignatureType::SubkeyBinding))
        .filter(valid)
        .max_by_key(|s| s.created().map(|t| t.as_secs()).unwrap_or(0))
        .ok_or_else(|| SignatureError::UnusableKey(fp.clone()))?;
    let back_signed = binding
        .embedded_signature()
        .is_some_and(|b| b.verify_primary_key_binding(&sub.key, primary).is_ok());
    if !binding.key_flags().sign() || !back_signed {
        return Err(SignatureError::UnusableKey(fp));
    }
    match binding.key_expiration_time() {
        Some(d) if d.as_secs() > 0 && after(sub.key.created_at(), d.as_secs(), now) => {
            Err(SignatureError::ExpiredKey(fp))
        }
        _ => Ok(()),
    }
}

/// Whether `now` is past `start + secs`.
fn after(start: Timestamp, secs: u32, now: SystemTime) -> bool {
    let end =
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(start.as_secs()) + u64::from(secs));
    now > end
}

fn fingerprint(key: &impl KeyDetails) -> String {
    format!("{:X}", key.fingerprint())
}

/// The issuer a signature names, for messages.
fn issuer_of(sig: &Signature) -> String {
    if let Some(fp) = sig.issuer_fingerprint().first() {
        return format!("{fp:X}");
    }
    sig.issuer_key_id()
        .first()
        .map(|id| hex::encode_upper(id.as_ref()))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A throwaway GnuPG home, keys made the way vendors make them.
    struct Gpg(tempfile::TempDir);

    impl Gpg {
        fn new() -> Gpg {
            Gpg(tempfile::tempdir().unwrap())
        }

        fn run(&self, args: &[&str]) -> Vec<u8> {
            let out = Command::new("gpg")
                .arg("--homedir")
                .arg(self.0.path())
                .args([
                    "--batch",
                    "--yes",
                    "--pinentry-mode",
                    "loopback",
                    "--passphrase",
                    "",
                ])
                .args(args)
                .output()
                .expect("gpg runs");
            assert!(
                out.status.success(),
                "gpg {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        }

        /// A new key (`uid`) and its fingerprint; `faked` runs gpg at another time.
        fn key(&self, uid: &str, algo: &str, expire: &str, faked: Option<&str>) -> String {
            let mut args = vec![];
            if let Some(t) = faked {
                args.extend(["--faked-system-time", t]);
            }
            args.extend(["--quick-gen-key", uid, algo, "sign", expire]);
            self.run(&args);
            let listing =
                String::from_utf8(self.run(&["--with-colons", "--list-keys", uid])).unwrap();
            listing
                .lines()
                .find_map(|l| l.strip_prefix("fpr:"))
                .map(|l| l.trim_matches(':').to_string())
                .unwrap()
        }

        fn keyring(&self, uid: &str) -> PathBuf {
            let path = self.0.path().join(format!("{}.gpg", uid.len()));
            std::fs::write(&path, self.run(&["--export", uid])).unwrap();
            path
        }

        fn sign(&self, uid: &str, mode: &str, data: &[u8], faked: Option<&str>) -> Vec<u8> {
            let input = self.0.path().join("input");
            std::fs::write(&input, data).unwrap();
            let mut args = vec![];
            if let Some(t) = faked {
                args.extend(["--faked-system-time", t]);
            }
            args.extend(["--local-user", uid, "--output", "-"]);
            args.extend(mode.split(' '));
            let input = input.display().to_string();
            args.push(&input);
            self.run(&args)
        }
    }

    const SUMS: &[u8] =
        b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa  disk.img\n";

    #[test]
    fn detached_and_clearsigned_manifests() {
        let gpg = Gpg::new();
        let fp = gpg.key("vendor@example.com", "ed25519", "1y", None);
        let ring = Keyring::load(&gpg.keyring("vendor@example.com")).unwrap();
        assert_eq!(ring.fingerprints(), vec![fp.clone()]);
        let now = SystemTime::now();
        for mode in ["--detach-sign", "--armor --detach-sign"] {
            let sig = gpg.sign("vendor@example.com", mode, SUMS, None);
            assert_eq!(ring.verify_detached(SUMS, &sig, now).unwrap(), fp, "{mode}");
            let mut tampered = SUMS.to_vec();
            tampered[0] = b'b';
            assert_eq!(
                ring.verify_detached(&tampered, &sig, now),
                Err(SignatureError::Bad(fp.clone()))
            );
        }
        let clear = gpg.sign("vendor@example.com", "--clearsign", SUMS, None);
        let clear = String::from_utf8(clear).unwrap();
        assert!(is_clearsigned(&clear));
        let (by, text) = ring.verify_clearsigned(&clear, now).unwrap();
        assert_eq!(by, fp);
        assert!(text.starts_with("aaaa"), "{text}");
        // A changed signed line fails; lines added after the signature make it unreadable.
        let changed = clear.replacen("aaaa", "abaa", 1);
        assert!(matches!(
            ring.verify_clearsigned(&changed, now),
            Err(SignatureError::Bad(_))
        ));
        assert_eq!(clearsigned_text(&clear).unwrap(), text);
        assert!(clearsigned_text(&format!("{clear}\nbbbb  disk.img\n")).is_err());
    }

    #[test]
    fn unknown_expired_and_rsa_subkey_signers() {
        let gpg = Gpg::new();
        gpg.key("trusted@example.com", "ed25519", "1y", None);
        gpg.key("stranger@example.com", "ed25519", "1y", None);
        let ring = Keyring::load(&gpg.keyring("trusted@example.com")).unwrap();
        let now = SystemTime::now();
        let sig = gpg.sign("stranger@example.com", "--detach-sign", SUMS, None);
        assert!(matches!(
            ring.verify_detached(SUMS, &sig, now),
            Err(SignatureError::UnknownKey { .. })
        ));
        // A key made in 2020 that expired a day later; it signed while it was valid.
        let old = gpg.key("old@example.com", "ed25519", "1d", Some("20200101T000000"));
        let old_ring = Keyring::load(&gpg.keyring("old@example.com")).unwrap();
        let sig = gpg.sign(
            "old@example.com",
            "--detach-sign",
            SUMS,
            Some("20200101T120000"),
        );
        assert_eq!(
            old_ring.verify_detached(SUMS, &sig, now),
            Err(SignatureError::ExpiredKey(old.clone()))
        );
        let then = SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_880_000 + 3600);
        assert_eq!(old_ring.verify_detached(SUMS, &sig, then).unwrap(), old);
        // RSA primary with a signing subkey, as most vendors' keys are.
        let fp = gpg.key("rsa@example.com", "rsa2048", "1y", None);
        gpg.run(&["--quick-add-key", &fp, "rsa2048", "sign", "1y"]);
        let rsa = Keyring::load(&gpg.keyring("rsa@example.com")).unwrap();
        let sig = gpg.sign("rsa@example.com", "--detach-sign", SUMS, None);
        assert_eq!(rsa.verify_detached(SUMS, &sig, now).unwrap(), fp);
    }

    #[test]
    fn keyrings_that_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ring");
        std::fs::write(&path, b"not a key").unwrap();
        assert!(Keyring::load(&path).is_err());
        assert!(Keyring::load(&tmp.path().join("missing")).is_err());
    }
}
