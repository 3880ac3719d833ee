//! Certificates for node-to-node mutual TLS.
//!
//! Every node holds a certificate signed by the cluster's CA. The node id is
//! carried in the certificate as the DNS name `node-<id>.tollgate`, so a peer
//! knows which node it talks to from the handshake alone.
//!
//! [`init`] makes a development CA and node certificates (production
//! deployments bring their own PEM files and point [`TlsFiles`] at them);
//! [`TlsMaterial::load`] reads and checks the PEM files a node runs with.
//!
//! The keys [`init`] makes are Ed25519: small, fast, and with signatures of
//! one fixed length; serial numbers have one fixed length too. So a
//! handshake's size never depends on randomness (which keeps the
//! simulator's packet count, and so its schedule, the same from one process
//! to the next).

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use chrono::{Datelike, Months, NaiveDate};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// File name of the CA certificate written by [`init`].
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key written by [`init`].
pub const CA_KEY_FILE: &str = "ca.key";

const CA_COMMON_NAME: &str = "tollgate dev CA";
/// How long development certificates are valid.
const VALIDITY_YEARS: u32 = 10;
/// The key type of the certificates [`init`] makes.
const KEY_ALGORITHM: &rcgen::SignatureAlgorithm = &rcgen::PKCS_ED25519;

/// The crypto provider every TLS config of the node is built with: *ring*,
/// passed explicitly rather than installed as the process default.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The DNS name that carries a node id in its certificate.
pub fn node_dns_name(id: u64) -> String {
    format!("node-{id}.tollgate")
}

/// The PEM files a node's TLS identity is read from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificate(s) peers' certificates must chain to.
    pub ca: PathBuf,
    /// This node's certificate (chain, leaf first).
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// The paths [`init`] writes for node `id` in `dir`.
pub fn node_files(dir: &Path, id: u64) -> TlsFiles {
    TlsFiles {
        ca: dir.join(CA_CERT_FILE),
        cert: dir.join(format!("node-{id}.pem")),
        key: dir.join(format!("node-{id}.key")),
    }
}

/// What [`init`] wrote or found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertPaths {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The CA private key.
    pub ca_key: PathBuf,
    /// Whether the CA was made by this call (false: an existing one was reused).
    pub ca_created: bool,
    /// One entry per requested node id, in the order given.
    pub nodes: Vec<NodeCertPaths>,
}

/// One node's files from [`init`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeCertPaths {
    pub id: u64,
    pub files: TlsFiles,
    /// Whether the certificate was made by this call (false: it already existed).
    pub created: bool,
}

/// Makes a development CA and node certificates in `out_dir`.
///
/// Writes `ca.pem` and `ca.key`, and `node-<id>.pem` and `node-<id>.key` for
/// every id; keys are written with mode 0600. An existing CA in `out_dir` is
/// reused and existing node certificates are kept, so re-running `init` with
/// more ids adds nodes to the same cluster.
pub fn init(out_dir: &Path, node_ids: &[u64]) -> anyhow::Result<CertPaths> {
    fs::create_dir_all(out_dir)
        .with_context(|| format!("creating certificate directory {}", out_dir.display()))?;
    let ca_cert_path = out_dir.join(CA_CERT_FILE);
    let ca_key_path = out_dir.join(CA_KEY_FILE);

    let (issuer, ca_created) = match (ca_cert_path.exists(), ca_key_path.exists()) {
        (true, true) => (load_ca(&ca_cert_path, &ca_key_path)?, false),
        (false, false) => (create_ca(&ca_cert_path, &ca_key_path)?, true),
        (true, false) => bail!(
            "{} exists but its key {} is missing; remove it or restore the key",
            ca_cert_path.display(),
            ca_key_path.display()
        ),
        (false, true) => bail!(
            "{} exists but its certificate {} is missing; remove it or restore the certificate",
            ca_key_path.display(),
            ca_cert_path.display()
        ),
    };

    let mut nodes = Vec::with_capacity(node_ids.len());
    for &id in node_ids {
        let files = node_files(out_dir, id);
        let created = match (files.cert.exists(), files.key.exists()) {
            (true, true) => false,
            (false, false) => {
                create_node_cert(&issuer, id, &files)?;
                true
            }
            (true, false) => bail!(
                "{} exists but its key {} is missing",
                files.cert.display(),
                files.key.display()
            ),
            (false, true) => bail!(
                "{} exists but its certificate {} is missing",
                files.key.display(),
                files.cert.display()
            ),
        };
        nodes.push(NodeCertPaths { id, files, created });
    }

    Ok(CertPaths {
        ca: ca_cert_path,
        ca_key: ca_key_path,
        ca_created,
        nodes,
    })
}

/// Validity window: from yesterday (tolerates clock skew between nodes) for
/// ten years.
fn validity(params: &mut CertificateParams) -> anyhow::Result<()> {
    let today = chrono::Utc::now().date_naive();
    let from = today.pred_opt().unwrap_or(today);
    let until = from
        .checked_add_months(Months::new(12 * VALIDITY_YEARS))
        .ok_or_else(|| anyhow!("certificate validity overflows the calendar"))?;
    let (year, month, day) = ymd(from)?;
    params.not_before = rcgen::date_time_ymd(year, month, day);
    let (year, month, day) = ymd(until)?;
    params.not_after = rcgen::date_time_ymd(year, month, day);
    Ok(())
}

fn ymd(date: NaiveDate) -> anyhow::Result<(i32, u8, u8)> {
    let month = u8::try_from(date.month()).context("month out of range")?;
    let day = u8::try_from(date.day()).context("day out of range")?;
    Ok((date.year(), month, day))
}

/// A random serial number of one fixed encoded length: 20 bytes (the most
/// RFC 5280 allows), the first in `0x40..=0x7f` so that it is positive and
/// never loses a leading zero byte. A fixed length keeps every certificate
/// of a set, and so every handshake, the same size.
fn serial_number() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 20];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    bytes[0] = 0x40 | (bytes[0] & 0x3f);
    rcgen::SerialNumber::from_slice(&bytes)
}

fn create_ca(cert_path: &Path, key_path: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params)?;
    params.serial_number = Some(serial_number());
    let key = KeyPair::generate_for(KEY_ALGORITHM).context("generating the CA key")?;
    let cert = params
        .self_signed(&key)
        .context("signing the CA certificate")?;
    write_new(key_path, key.serialize_pem().as_bytes(), true)?;
    write_new(cert_path, cert.pem().as_bytes(), false)?;
    Ok(Issuer::new(params, key))
}

fn load_ca(cert_path: &Path, key_path: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let key_pem = fs::read_to_string(key_path)
        .with_context(|| format!("reading CA key {}", key_path.display()))?;
    // The key's own parse error is not shown: it could quote key material.
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|_| anyhow!("{}: not a usable PEM private key", key_path.display()))?;
    let cert_pem = fs::read_to_string(cert_path)
        .with_context(|| format!("reading CA certificate {}", cert_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
        .with_context(|| format!("{}: not a usable CA certificate", cert_path.display()))?;
    // The key must be the one the CA certificate was issued for, or every
    // node certificate signed with it would fail verification.
    let ca_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .with_context(|| format!("{}: no certificate in PEM", cert_path.display()))?;
    let parsed = parse_cert(&ca_der)
        .with_context(|| format!("{}: not a valid X.509 certificate", cert_path.display()))?;
    if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(issuer.key()) {
        bail!(
            "{} is not the key of the CA certificate {}",
            key_path.display(),
            cert_path.display()
        );
    }
    Ok(issuer)
}

fn create_node_cert(
    issuer: &Issuer<'static, KeyPair>,
    id: u64,
    files: &TlsFiles,
) -> anyhow::Result<()> {
    let mut params = CertificateParams::new(vec![node_dns_name(id), "localhost".to_owned()])
        .context("building node certificate parameters")?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("tollgate node {id}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params)?;
    params.serial_number = Some(serial_number());
    let key = KeyPair::generate_for(KEY_ALGORITHM).context("generating a node key")?;
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("signing the certificate of node {id}"))?;
    write_new(&files.key, key.serialize_pem().as_bytes(), true)?;
    write_new(&files.cert, cert.pem().as_bytes(), false)?;
    Ok(())
}

/// Writes a file that must not exist yet, through a temporary file and a
/// rename so a crash leaves no half-written file. Private files get mode 0600
/// from the start.
fn write_new(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let result = (|| -> std::io::Result<()> {
        let mut file = options.open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        if path.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "file already exists",
            ));
        }
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// A node's TLS identity and trust roots, read from [`TlsFiles`].
pub struct TlsMaterial {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    node_id: Option<u64>,
    cert_path: PathBuf,
}

impl TlsMaterial {
    /// Reads the CA certificate(s), the node certificate chain and the key,
    /// and checks that they are usable: at least one certificate in each
    /// certificate file, a private key that matches the node certificate.
    pub fn load(files: &TlsFiles) -> anyhow::Result<Self> {
        let ca = read_certs(&files.ca, "CA certificate")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in &ca {
            roots
                .add(cert.clone())
                .with_context(|| format!("{}: not a usable CA certificate", files.ca.display()))?;
        }
        let chain = read_certs(&files.cert, "node certificate")?;
        let key_pem = fs::read(&files.key)
            .with_context(|| format!("reading private key {}", files.key.display()))?;
        let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
            Ok(key) => key,
            Err(rustls_pki_types::pem::Error::NoItemsFound) => {
                bail!("{}: no private key found in PEM", files.key.display())
            }
            // The parse error is not shown: it could quote key material.
            Err(_) => bail!("{}: not a valid PEM private key", files.key.display()),
        };
        let provider = crypto_provider();
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
            |e| {
                anyhow!(
                    "{} does not hold the key of {}: {e}",
                    files.key.display(),
                    files.cert.display()
                )
            },
        )?;
        let node_id = chain.first().and_then(|leaf| node_id_from_cert(leaf));
        Ok(Self {
            ca,
            chain,
            key,
            node_id,
            cert_path: files.cert.clone(),
        })
    }

    /// The CA certificates peers must chain to.
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    /// This node's certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// This node's private key.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// The node id in this node's certificate, if it has one.
    pub fn node_id(&self) -> Option<u64> {
        self.node_id
    }

    /// Where the node certificate was read from (for messages).
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            node_id: self.node_id,
            cert_path: self.cert_path.clone(),
        }
    }
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_certs", &self.ca.len())
            .field("chain", &self.chain.len())
            .field("key", &"[elided]")
            .field("node_id", &self.node_id)
            .field("cert_path", &self.cert_path)
            .finish()
    }
}

fn read_certs(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = fs::read(path).with_context(|| format!("reading {what} {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: invalid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate found in PEM", path.display());
    }
    Ok(certs)
}

fn parse_cert(der: &[u8]) -> anyhow::Result<x509_parser::certificate::X509Certificate<'_>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow!("invalid certificate: {e}"))?;
    Ok(cert)
}

/// The node id a certificate was issued for: the `<id>` of its
/// `node-<id>.tollgate` DNS name. None if the certificate does not parse, has
/// no such name, or names more than one node.
pub fn node_id_from_cert(der: &[u8]) -> Option<u64> {
    let cert = parse_cert(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut found = None;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::DNSName(dns) = name
            && let Some(id) = parse_node_dns_name(dns)
        {
            match found {
                None => found = Some(id),
                Some(other) if other == id => {}
                Some(_) => return None,
            }
        }
    }
    found
}

fn parse_node_dns_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("node-")?.strip_suffix(".tollgate")?;
    // Canonical decimal only: "node-01.tollgate" is not node 1.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_dns_names_parse_strictly() {
        assert_eq!(parse_node_dns_name("node-7.tollgate"), Some(7));
        assert_eq!(parse_node_dns_name("node-0.tollgate"), Some(0));
        assert_eq!(parse_node_dns_name("node-07.tollgate"), None);
        assert_eq!(parse_node_dns_name("node-.tollgate"), None);
        assert_eq!(parse_node_dns_name("node-1x.tollgate"), None);
        assert_eq!(parse_node_dns_name("node-1.example"), None);
        assert_eq!(parse_node_dns_name("localhost"), None);
        assert_eq!(
            parse_node_dns_name("node-99999999999999999999999.tollgate"),
            None
        );
    }

    #[test]
    fn init_writes_keys_private_and_certs_carry_the_node_id() {
        let dir = tempfile::tempdir().unwrap();
        let paths = init(dir.path(), &[1, 2]).unwrap();
        assert!(paths.ca_created);
        assert_eq!(paths.nodes.len(), 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [
                &paths.ca_key,
                &paths.nodes[0].files.key,
                &paths.nodes[1].files.key,
            ] {
                let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", key.display());
            }
        }
        for node in &paths.nodes {
            let material = TlsMaterial::load(&node.files).unwrap();
            assert_eq!(material.node_id(), Some(node.id));
            assert!(!format!("{material:?}").contains("PRIVATE"));
        }
        let again = init(dir.path(), &[2, 3]).unwrap();
        assert!(!again.ca_created);
        assert!(!again.nodes[0].created);
        assert!(again.nodes[1].created);
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[1]).unwrap();
        let mut files = node_files(dir.path(), 1);
        files.cert = dir.path().join("missing.pem");
        let err = format!("{:#}", TlsMaterial::load(&files).unwrap_err());
        assert!(err.contains("missing.pem"), "{err}");

        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "no pem here\n").unwrap();
        let mut files = node_files(dir.path(), 1);
        files.ca = empty.clone();
        let err = format!("{:#}", TlsMaterial::load(&files).unwrap_err());
        assert!(
            err.contains("empty.pem") && err.contains("no certificate"),
            "{err}"
        );

        let mut files = node_files(dir.path(), 1);
        files.key = empty;
        let err = format!("{:#}", TlsMaterial::load(&files).unwrap_err());
        assert!(
            err.contains("empty.pem") && err.contains("no private key"),
            "{err}"
        );

        // A key that is not the certificate's.
        init(dir.path(), &[2]).unwrap();
        let mut files = node_files(dir.path(), 1);
        files.key = node_files(dir.path(), 2).key;
        let err = format!("{:#}", TlsMaterial::load(&files).unwrap_err());
        assert!(err.contains("node-2.key"), "{err}");
    }

    #[test]
    fn tls_files_reject_unknown_fields() {
        let ok: TlsFiles =
            serde_json::from_str(r#"{"ca":"a.pem","cert":"b.pem","key":"c.key"}"#).unwrap();
        assert_eq!(ok.key, PathBuf::from("c.key"));
        assert!(
            serde_json::from_str::<TlsFiles>(r#"{"ca":"a","cert":"b","key":"c","x":1}"#).is_err()
        );
    }
}
