//! Connections to etcd: mutual TLS with a client certificate machined issues itself from
//! the etcd CA at start (it never leaves memory), through the `etcd-client` crate.

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use keelson_configs::pki::{self, CertAndKey, LeafRequest, Usage};

use super::EtcdError;
use super::plan::Member;

/// How long a connection may take to come up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one call may take (a snapshot streams longer: its own deadline per message).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// What a connection to etcd needs: the CA to trust and the identity to show, issued
/// at the first connection (a control plane that only waits for a cluster, with no
/// other control plane to ask, never issues it).
#[derive(Clone)]
pub struct Credentials {
    ca: CertAndKey,
    identity: std::sync::Arc<std::sync::OnceLock<CertAndKey>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    /// Credentials from the etcd CA; machined's client certificate comes later.
    pub fn new(ca: &CertAndKey) -> Credentials {
        Credentials {
            ca: ca.clone(),
            identity: std::sync::Arc::default(),
        }
    }

    /// machined's client certificate, issued from the etcd CA the first time.
    fn identity(&self) -> Result<&CertAndKey, EtcdError> {
        if let Some(identity) = self.identity.get() {
            return Ok(identity);
        }
        let issued = pki::issue(
            &self.ca,
            &LeafRequest {
                common_name: "keelson-machined".into(),
                organizations: Vec::new(),
                sans: Vec::new(),
                usage: Usage::Client,
            },
        )
        .map_err(|e| EtcdError::Pki(e.to_string()))?;
        Ok(self.identity.get_or_init(|| issued))
    }

    /// A client of the members at `urls` (`https://HOST:2379`); the first call fails if
    /// none answers.
    pub async fn connect(&self, urls: &[String]) -> Result<Client, EtcdError> {
        let identity = self.identity()?;
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(&self.ca.cert))
            .identity(Identity::from_pem(&identity.cert, &identity.key));
        let options = ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(CALL_TIMEOUT);
        Client::connect(urls, Some(options))
            .await
            .map_err(|e| EtcdError::Connect {
                urls: urls.join(", "),
                reason: e.to_string(),
            })
    }
}

/// A member as the client crate gives it, as the controller's plan takes it.
pub fn member(m: &etcd_client::Member) -> Member {
    Member {
        id: m.id(),
        name: m.name().to_owned(),
        peer_urls: m.peer_urls().to_vec(),
        client_urls: m.client_urls().to_vec(),
        learner: m.is_learner(),
    }
}

/// The cluster's members as `client` sees them.
pub async fn members(client: &mut Client) -> Result<Vec<Member>, EtcdError> {
    let list = client
        .member_list()
        .await
        .map_err(|e| EtcdError::call("member list", e))?;
    Ok(list.members().iter().map(member).collect())
}

/// The ID of the member `client` talks to.
pub async fn own_id(client: &mut Client) -> Result<u64, EtcdError> {
    Ok(client
        .status()
        .await
        .map_err(|e| EtcdError::call("status", e))?
        .header()
        .map(|h| h.member_id())
        .unwrap_or_default())
}

/// The members that answer a status call on one of their client URLs within a few
/// seconds, for quorum checks.
pub async fn answering(credentials: &Credentials, members: &[Member]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for m in members {
        if m.client_urls.is_empty() {
            continue;
        }
        let probe = async {
            let mut client = credentials.connect(&m.client_urls).await.ok()?;
            client.status().await.ok()
        };
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(4), probe).await {
            out.insert(m.id);
        }
    }
    out
}
