//! Containers, images and image import through containerd's own gRPC API (the
//! `containerd-client` crate), over `/run/containerd/containerd.sock`.
//!
//! `image import` takes an OCI image archive (a tar of an OCI image layout: `oci-layout`,
//! `index.json`, `blobs/sha256/...`, as `docker save` and `buildah push oci-archive:`
//! write them). Every blob is written to containerd's content store under a lease (so
//! garbage collection cannot take it half-way), manifests and indexes carry the
//! `containerd.io/gc.ref.content.*` labels that keep their children alive, and an image
//! record is created (or updated) for each manifest the index names, under the name in
//! its `io.containerd.image.name` or `org.opencontainers.image.ref.name` annotation.
//! Layers are unpacked into a snapshot when a container first uses the image.

#[cfg(not(feature = "containerd"))]
use std::path::Path;

#[cfg(not(feature = "containerd"))]
use tonic::Status;

#[cfg(not(feature = "containerd"))]
use keelson_api::api::proto;

#[cfg(not(feature = "containerd"))]
fn unimplemented() -> Status {
    Status::unimplemented(
        "this machined was built without containerd support (feature `containerd`)",
    )
}

/// Every container in `namespace` (all namespaces when empty), with its task's state.
#[cfg(not(feature = "containerd"))]
pub async fn containers(_socket: &Path, _namespace: &str) -> Result<Vec<proto::Container>, Status> {
    Err(unimplemented())
}

/// Every image in `namespace` (all namespaces when empty).
#[cfg(not(feature = "containerd"))]
pub async fn images(_socket: &Path, _namespace: &str) -> Result<Vec<proto::Image>, Status> {
    Err(unimplemented())
}

/// Imports the OCI archive at `archive` into `namespace`.
#[cfg(not(feature = "containerd"))]
pub async fn import(
    _socket: &Path,
    _namespace: &str,
    _archive: &Path,
) -> Result<Vec<proto::Image>, Status> {
    Err(unimplemented())
}

/// Imports the OCI archive at `archive` into `namespace` for a caller with `role`.
#[cfg(not(feature = "containerd"))]
pub async fn import_as(
    _socket: &Path,
    _namespace: &str,
    _archive: &Path,
    _role: keelson_configs::pki::Role,
) -> Result<Vec<proto::Image>, Status> {
    Err(unimplemented())
}

#[cfg(feature = "containerd")]
pub use imp::{containers, images, import, import_as};

/// The parsing of an OCI archive, independent of containerd (unit-tested on its own).
pub mod oci {
    use std::collections::BTreeMap;
    use std::io::{Read, Seek, SeekFrom};
    use std::path::Path;

    use keelson_configs::pki::Role;
    use serde::Deserialize;

    /// The largest manifest or index read into memory.
    const MAX_JSON: u64 = 4 * 1024 * 1024;

    /// Media types of indexes (image lists).
    pub const INDEX_TYPES: [&str; 2] = [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ];
    /// Media types of image manifests.
    pub const MANIFEST_TYPES: [&str; 2] = [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ];

    /// Errors of reading an archive.
    #[derive(Debug, thiserror::Error)]
    pub enum OciError {
        /// The tar could not be read.
        #[error("the upload is not a readable tar archive")]
        Tar(#[source] std::io::Error),
        /// A required member is missing.
        #[error(
            "the archive has no {0}: it is not an OCI image layout (make one with `docker save` or `buildah push IMAGE oci-archive:FILE`)"
        )]
        Missing(String),
        /// JSON that does not parse.
        #[error("{what} is not valid OCI JSON: {detail}")]
        Json {
            /// Which member.
            what: String,
            /// The parser's message.
            detail: String,
        },
        /// A digest is not `sha256:` + 64 hex digits.
        #[error("unsupported digest {0:?}: only sha256 digests are imported")]
        Digest(String),
        /// A blob's size differs from its descriptor.
        #[error("blob {digest} is {actual} bytes, but its descriptor says {expected}")]
        Size {
            /// The digest.
            digest: String,
            /// What the descriptor says.
            expected: u64,
            /// What the archive holds.
            actual: u64,
        },
        /// No manifest carries a usable name.
        #[error(
            "the manifest {digest} has no image name: annotate it with io.containerd.image.name or a full org.opencontainers.image.ref.name (e.g. docker.io/library/app:1.0)"
        )]
        NoName {
            /// The manifest's digest.
            digest: String,
        },
        /// The archive would repoint existing image names, and the caller is not an admin.
        #[error(
            "permission denied: the archive would replace {names} in containerd namespace {namespace:?} (they exist with another target); replacing an image needs role admin, your certificate has {have}: import it under a new name or tag, or ask an admin"
        )]
        Replaces {
            /// The names, comma-separated.
            names: String,
            /// The namespace.
            namespace: String,
            /// The caller's role.
            have: Role,
        },
        /// A name pinned by digest points at other content, and the caller is not an admin.
        #[error(
            "permission denied: the archive names {name} but that image is {digest}; a name pinned by digest must be its own digest (only role admin may import otherwise, your certificate has {have})"
        )]
        DigestName {
            /// The name.
            name: String,
            /// The digest of what it points at.
            digest: String,
            /// The caller's role.
            have: Role,
        },
    }

    /// The names in `images` that already exist (`existing`: name to target digest) with
    /// another target: importing them would repoint them.
    pub fn replaced<'a>(
        images: &'a [NamedImage],
        existing: &BTreeMap<String, String>,
    ) -> Vec<&'a str> {
        images
            .iter()
            .filter(|i| {
                existing
                    .get(&i.name)
                    .is_some_and(|digest| *digest != i.target.digest)
            })
            .map(|i| i.name.as_str())
            .collect()
    }

    /// Whether `role` may import `images` into `namespace`, where `existing` already is:
    /// only an admin may repoint a name that exists (an operator who could would change
    /// what a privileged pod runs at its next start), or name an image `REPO@sha256:D`
    /// that is not D (a pod pinned by digest would run it). Re-importing a name with the
    /// same target changes nothing and is allowed.
    pub fn may_import(
        images: &[NamedImage],
        existing: &BTreeMap<String, String>,
        namespace: &str,
        role: Role,
    ) -> Result<(), OciError> {
        if keelson_api::api::allows(role, Role::Admin) {
            return Ok(());
        }
        if let Some(lie) = images.iter().find(|i| {
            i.name
                .rsplit_once('@')
                .is_some_and(|(_, digest)| digest != i.target.digest)
        }) {
            return Err(OciError::DigestName {
                name: lie.name.clone(),
                digest: lie.target.digest.clone(),
                have: role,
            });
        }
        let replaced = replaced(images, existing);
        if replaced.is_empty() {
            return Ok(());
        }
        Err(OciError::Replaces {
            names: replaced.join(", "),
            namespace: namespace.to_owned(),
            have: role,
        })
    }

    /// An OCI content descriptor.
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Descriptor {
        /// Its media type.
        #[serde(default)]
        pub media_type: String,
        /// `sha256:...`.
        pub digest: String,
        /// Its size in bytes.
        pub size: u64,
        /// Its annotations.
        #[serde(default)]
        pub annotations: BTreeMap<String, String>,
    }

    #[derive(Debug, Deserialize)]
    struct Index {
        #[serde(default)]
        manifests: Vec<Descriptor>,
    }

    #[derive(Debug, Deserialize)]
    struct Manifest {
        config: Descriptor,
        #[serde(default)]
        layers: Vec<Descriptor>,
    }

    /// A blob to write: where it is in the archive, and the labels it gets.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Blob {
        /// Its descriptor.
        pub descriptor: Descriptor,
        /// Its data's byte offset in the tar file.
        pub offset: u64,
        /// `containerd.io/gc.ref.content.*` labels naming its children.
        pub labels: BTreeMap<String, String>,
    }

    /// An image record to create.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct NamedImage {
        /// The image name.
        pub name: String,
        /// The manifest or index it points at.
        pub target: Descriptor,
    }

    /// What to import from an archive: blobs in write order (children first), then images.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Plan {
        /// The blobs.
        pub blobs: Vec<Blob>,
        /// The images.
        pub images: Vec<NamedImage>,
    }

    fn hex_of(digest: &str) -> Result<&str, OciError> {
        digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| OciError::Digest(digest.to_owned()))
    }

    fn read_json<T: for<'de> Deserialize<'de>>(
        file: &mut std::fs::File,
        offset: u64,
        size: u64,
        what: &str,
    ) -> Result<T, OciError> {
        if size > MAX_JSON {
            return Err(OciError::Json {
                what: what.to_owned(),
                detail: format!("{size} bytes is too large for a manifest"),
            });
        }
        file.seek(SeekFrom::Start(offset)).map_err(OciError::Tar)?;
        let mut buf = Vec::new();
        file.take(size)
            .read_to_end(&mut buf)
            .map_err(OciError::Tar)?;
        serde_json::from_slice(&buf).map_err(|e| OciError::Json {
            what: what.to_owned(),
            detail: e.to_string(),
        })
    }

    fn image_name(d: &Descriptor) -> Option<String> {
        if let Some(n) = d.annotations.get("io.containerd.image.name") {
            return Some(n.clone());
        }
        d.annotations
            .get("org.opencontainers.image.ref.name")
            .filter(|n| n.contains('/') || n.contains(':'))
            .cloned()
    }

    /// Reads the archive's table of contents and manifests into an import plan.
    pub fn plan(path: &Path) -> Result<Plan, OciError> {
        // Member name -> (data offset, size).
        let mut members: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        {
            let file = std::fs::File::open(path).map_err(OciError::Tar)?;
            let mut archive = tar::Archive::new(file);
            for entry in archive.entries().map_err(OciError::Tar)? {
                let entry = entry.map_err(OciError::Tar)?;
                let name = entry
                    .path()
                    .map_err(OciError::Tar)?
                    .to_string_lossy()
                    .trim_start_matches("./")
                    .to_owned();
                members.insert(name, (entry.raw_file_position(), entry.size()));
            }
        }
        let mut file = std::fs::File::open(path).map_err(OciError::Tar)?;
        let &(off, size) = members
            .get("index.json")
            .ok_or_else(|| OciError::Missing("index.json".into()))?;
        let index: Index = read_json(&mut file, off, size, "index.json")?;
        let mut plan = Plan {
            blobs: Vec::new(),
            images: Vec::new(),
        };
        for d in &index.manifests {
            let name = image_name(d).ok_or_else(|| OciError::NoName {
                digest: d.digest.clone(),
            })?;
            add(&mut plan, &members, &mut file, d, 0)?;
            plan.images.push(NamedImage {
                name,
                target: d.clone(),
            });
        }
        Ok(plan)
    }

    fn add(
        plan: &mut Plan,
        members: &BTreeMap<String, (u64, u64)>,
        file: &mut std::fs::File,
        d: &Descriptor,
        depth: u32,
    ) -> Result<(), OciError> {
        if plan.blobs.iter().any(|b| b.descriptor.digest == d.digest) {
            return Ok(());
        }
        let member = format!("blobs/sha256/{}", hex_of(&d.digest)?);
        let &(offset, size) = members
            .get(&member)
            .ok_or_else(|| OciError::Missing(member.clone()))?;
        if size != d.size {
            return Err(OciError::Size {
                digest: d.digest.clone(),
                expected: d.size,
                actual: size,
            });
        }
        let mut labels = BTreeMap::new();
        if depth < 4 && INDEX_TYPES.contains(&d.media_type.as_str()) {
            let index: Index = read_json(file, offset, size, &member)?;
            for (i, child) in index.manifests.iter().enumerate() {
                add(plan, members, file, child, depth + 1)?;
                labels.insert(
                    format!("containerd.io/gc.ref.content.m.{i}"),
                    child.digest.clone(),
                );
            }
        } else if MANIFEST_TYPES.contains(&d.media_type.as_str()) {
            let manifest: Manifest = read_json(file, offset, size, &member)?;
            add(plan, members, file, &manifest.config, depth + 1)?;
            labels.insert(
                "containerd.io/gc.ref.content.config".into(),
                manifest.config.digest.clone(),
            );
            for (i, layer) in manifest.layers.iter().enumerate() {
                add(plan, members, file, layer, depth + 1)?;
                labels.insert(
                    format!("containerd.io/gc.ref.content.l.{i}"),
                    layer.digest.clone(),
                );
            }
        }
        plan.blobs.push(Blob {
            descriptor: d.clone(),
            offset,
            labels,
        });
        Ok(())
    }
}

#[cfg(feature = "containerd")]
mod imp {
    use std::collections::{BTreeMap, HashMap};
    use std::path::Path;

    use containerd_client::services::v1::containers_client::ContainersClient;
    use containerd_client::services::v1::content_client::ContentClient;
    use containerd_client::services::v1::images_client::ImagesClient;
    use containerd_client::services::v1::leases_client::LeasesClient;
    use containerd_client::services::v1::namespaces_client::NamespacesClient;
    use containerd_client::services::v1::tasks_client::TasksClient;
    use containerd_client::services::v1::{
        CreateImageRequest, CreateRequest as CreateLeaseRequest,
        DeleteRequest as DeleteLeaseRequest, Image, InfoRequest, ListContainersRequest,
        ListImagesRequest, ListNamespacesRequest, ListTasksRequest, UpdateImageRequest,
        WriteAction, WriteContentRequest,
    };
    use containerd_client::tonic::transport::Channel;
    use containerd_client::types::Descriptor;
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    use tonic::{Code, Request, Status};

    use super::oci;
    use keelson_api::api::proto;
    use keelson_configs::pki::Role;

    /// Bytes per content write message.
    const WRITE_CHUNK: usize = 1024 * 1024;

    async fn connect(socket: &Path) -> Result<Channel, Status> {
        containerd_client::connect(socket).await.map_err(|e| {
            Status::unavailable(format!(
                "cannot reach containerd at {}: {} (is the containerd service running? see `machinectl services`)",
                socket.display(),
                keelson_api::error_chain(&e)
            ))
        })
    }

    fn with_ns<T>(msg: T, namespace: &str, lease: Option<&str>) -> Result<Request<T>, Status> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        md.insert(
            "containerd-namespace",
            namespace
                .parse()
                .map_err(|_| Status::invalid_argument(format!("bad namespace {namespace:?}")))?,
        );
        if let Some(lease) = lease {
            md.insert(
                "containerd-lease",
                lease
                    .parse()
                    .map_err(|_| Status::internal("bad lease id"))?,
            );
        }
        Ok(req)
    }

    fn from_containerd(what: &str, s: Status) -> Status {
        Status::new(s.code(), format!("containerd: {what}: {}", s.message()))
    }

    async fn namespaces(channel: &Channel, only: &str) -> Result<Vec<String>, Status> {
        if !only.is_empty() {
            return Ok(vec![only.to_owned()]);
        }
        let resp = NamespacesClient::new(channel.clone())
            .list(ListNamespacesRequest::default())
            .await
            .map_err(|s| from_containerd("listing namespaces", s))?;
        Ok(resp
            .into_inner()
            .namespaces
            .into_iter()
            .map(|n| n.name)
            .collect())
    }

    fn task_status(code: i32) -> &'static str {
        match code {
            1 => "created",
            2 => "running",
            3 => "stopped",
            4 => "paused",
            5 => "pausing",
            _ => "unknown",
        }
    }

    /// Every container in `namespace` (all namespaces when empty), with its task's state.
    pub async fn containers(
        socket: &Path,
        namespace: &str,
    ) -> Result<Vec<proto::Container>, Status> {
        let channel = connect(socket).await?;
        let mut out = Vec::new();
        for ns in namespaces(&channel, namespace).await? {
            let containers = ContainersClient::new(channel.clone())
                .list(with_ns(ListContainersRequest::default(), &ns, None)?)
                .await
                .map_err(|s| from_containerd("listing containers", s))?
                .into_inner()
                .containers;
            let tasks: HashMap<String, (String, u32)> = TasksClient::new(channel.clone())
                .list(with_ns(ListTasksRequest::default(), &ns, None)?)
                .await
                .map_err(|s| from_containerd("listing tasks", s))?
                .into_inner()
                .tasks
                .into_iter()
                .map(|t| (t.id.clone(), (task_status(t.status).to_owned(), t.pid)))
                .collect();
            for c in containers {
                let (status, pid) = tasks.get(&c.id).cloned().unwrap_or_default();
                out.push(proto::Container {
                    namespace: ns.clone(),
                    id: c.id,
                    image: c.image,
                    status,
                    pid,
                });
            }
        }
        Ok(out)
    }

    fn image_out(ns: &str, image: Image) -> proto::Image {
        let target = image.target.unwrap_or_default();
        proto::Image {
            namespace: ns.to_owned(),
            name: image.name,
            digest: target.digest,
            media_type: target.media_type,
            size: u64::try_from(target.size).unwrap_or_default(),
        }
    }

    /// Every image in `namespace` (all namespaces when empty).
    pub async fn images(socket: &Path, namespace: &str) -> Result<Vec<proto::Image>, Status> {
        let channel = connect(socket).await?;
        let mut out = Vec::new();
        for ns in namespaces(&channel, namespace).await? {
            let images = ImagesClient::new(channel.clone())
                .list(with_ns(ListImagesRequest::default(), &ns, None)?)
                .await
                .map_err(|s| from_containerd("listing images", s))?
                .into_inner()
                .images;
            out.extend(images.into_iter().map(|i| image_out(&ns, i)));
        }
        Ok(out)
    }

    fn descriptor(d: &oci::Descriptor) -> Descriptor {
        Descriptor {
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            size: i64::try_from(d.size).unwrap_or(i64::MAX),
            annotations: d.annotations.clone().into_iter().collect(),
        }
    }

    async fn write_blob(
        channel: &Channel,
        ns: &str,
        lease: &str,
        archive: &Path,
        blob: &oci::Blob,
    ) -> Result<(), Status> {
        let d = &blob.descriptor;
        let mut content = ContentClient::new(channel.clone());
        let exists = content
            .info(with_ns(
                InfoRequest {
                    digest: d.digest.clone(),
                },
                ns,
                Some(lease),
            )?)
            .await;
        match exists {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(from_containerd("checking content", s)),
        }
        let mut file = tokio::fs::File::open(archive)
            .await
            .map_err(|e| Status::internal(format!("cannot reopen the spooled archive: {e}")))?;
        file.seek(std::io::SeekFrom::Start(blob.offset))
            .await
            .map_err(|e| Status::internal(format!("cannot read the spooled archive: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(2);
        let reference = format!("keelson-import-{}", d.digest);
        let total = i64::try_from(d.size).unwrap_or(i64::MAX);
        let (digest, labels) = (d.digest.clone(), blob.labels.clone());
        let size = d.size;
        let producer = tokio::spawn(async move {
            let mut offset: u64 = 0;
            let mut buf = vec![0u8; WRITE_CHUNK];
            while offset < size {
                let want =
                    usize::try_from((size - offset).min(WRITE_CHUNK as u64)).unwrap_or(WRITE_CHUNK);
                let Some(slice) = buf.get_mut(..want) else {
                    break;
                };
                if file.read_exact(slice).await.is_err() {
                    break;
                }
                let msg = WriteContentRequest {
                    action: WriteAction::Write.into(),
                    r#ref: reference.clone(),
                    total,
                    expected: digest.clone(),
                    offset: i64::try_from(offset).unwrap_or(i64::MAX),
                    data: slice.to_vec(),
                    labels: HashMap::new(),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
                offset += want as u64;
            }
            let _ = tx
                .send(WriteContentRequest {
                    action: WriteAction::Commit.into(),
                    r#ref: reference,
                    total,
                    expected: digest,
                    offset: i64::try_from(offset).unwrap_or(i64::MAX),
                    data: Vec::new(),
                    labels: labels.into_iter().collect(),
                })
                .await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let result = async {
            let mut responses = content
                .write(with_ns(stream, ns, Some(lease))?)
                .await
                .map_err(|s| from_containerd(&format!("writing {}", d.digest), s))?
                .into_inner();
            while responses
                .message()
                .await
                .map_err(|s| from_containerd(&format!("writing {}", d.digest), s))?
                .is_some()
            {}
            Ok::<(), Status>(())
        }
        .await;
        producer.abort();
        match result {
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            other => other,
        }
    }

    /// Imports the OCI archive at `archive` into `namespace` (machined's own archives: it
    /// may replace names).
    pub async fn import(
        socket: &Path,
        namespace: &str,
        archive: &Path,
    ) -> Result<Vec<proto::Image>, Status> {
        import_as(socket, namespace, archive, Role::Admin).await
    }

    /// Every image name in `namespace` and the digest of its target.
    async fn image_targets(
        channel: &Channel,
        namespace: &str,
    ) -> Result<BTreeMap<String, String>, Status> {
        let images = ImagesClient::new(channel.clone())
            .list(with_ns(ListImagesRequest::default(), namespace, None)?)
            .await
            .map_err(|s| from_containerd("listing images", s))?
            .into_inner()
            .images;
        Ok(images
            .into_iter()
            .map(|i| (i.name, i.target.map(|t| t.digest).unwrap_or_default()))
            .collect())
    }

    /// Imports the OCI archive at `archive` into `namespace` for a caller with `role`:
    /// before any blob is written, a caller below admin is refused whole if the archive
    /// would repoint a name that exists ([`oci::may_import`]); a name created by someone
    /// else meanwhile is refused at its creation too, never updated.
    pub async fn import_as(
        socket: &Path,
        namespace: &str,
        archive: &Path,
        role: Role,
    ) -> Result<Vec<proto::Image>, Status> {
        let path = archive.to_path_buf();
        let plan = tokio::task::spawn_blocking(move || oci::plan(&path))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::invalid_argument(keelson_api::error_chain(&e)))?;
        let channel = connect(socket).await?;
        let existing = image_targets(&channel, namespace).await?;
        oci::may_import(&plan.images, &existing, namespace, role)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let may_replace = keelson_api::api::allows(role, Role::Admin);
        let lease_id = format!("keelson-import-{}", std::process::id());
        let expire = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let expire = expire
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut leases = LeasesClient::new(channel.clone());
        leases
            .create(with_ns(
                CreateLeaseRequest {
                    id: lease_id.clone(),
                    labels: [("containerd.io/gc.expire".to_owned(), expire)]
                        .into_iter()
                        .collect(),
                },
                namespace,
                None,
            )?)
            .await
            .map_err(|s| from_containerd("creating a lease", s))?;
        let result = async {
            for blob in &plan.blobs {
                write_blob(&channel, namespace, &lease_id, archive, blob).await?;
            }
            let mut images = ImagesClient::new(channel.clone());
            let mut out = Vec::new();
            for named in &plan.images {
                let image = Image {
                    name: named.name.clone(),
                    labels: HashMap::new(),
                    target: Some(descriptor(&named.target)),
                    created_at: None,
                    updated_at: None,
                };
                let created = images
                    .create(with_ns(
                        CreateImageRequest {
                            image: Some(image.clone()),
                            source_date_epoch: None,
                        },
                        namespace,
                        Some(&lease_id),
                    )?)
                    .await;
                let stored = match created {
                    Ok(r) => r.into_inner().image,
                    Err(s) if s.code() == Code::AlreadyExists && !may_replace => {
                        if existing.get(&named.name) != Some(&named.target.digest) {
                            return Err(Status::permission_denied(format!(
                                "permission denied: {} was created in containerd namespace {namespace:?} during the import; replacing an image needs role admin, your certificate has {role}",
                                named.name
                            )));
                        }
                        None
                    }
                    Err(s) if s.code() == Code::AlreadyExists => {
                        images
                            .update(with_ns(
                                UpdateImageRequest {
                                    image: Some(image.clone()),
                                    update_mask: None,
                                    source_date_epoch: None,
                                },
                                namespace,
                                Some(&lease_id),
                            )?)
                            .await
                            .map_err(|s| from_containerd("updating the image", s))?
                            .into_inner()
                            .image
                    }
                    Err(s) => return Err(from_containerd("creating the image", s)),
                };
                out.push(image_out(namespace, stored.unwrap_or(image)));
            }
            Ok(out)
        }
        .await;
        let _ = leases
            .delete(with_ns(
                DeleteLeaseRequest {
                    id: lease_id,
                    sync: false,
                },
                namespace,
                None,
            )?)
            .await;
        result
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::oci;

    fn sha256_hex(data: &[u8]) -> String {
        use std::fmt::Write as _;
        let digest = ring::digest::digest(&ring::digest::SHA256, data);
        digest.as_ref().iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    #[test]
    fn an_oci_archive_becomes_a_plan_children_first() {
        let layer = b"layer bytes".to_vec();
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let (lh, ch) = (sha256_hex(&layer), sha256_hex(&config));
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{ch}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{lh}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        );
        let mh = sha256_hex(manifest.as_bytes());
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{mh}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"example.com/test/app:1.0"}}}}]}}"#,
            manifest.len()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.tar");
        let mut builder = tar::Builder::new(std::fs::File::create(&path).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, data).unwrap();
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        add("index.json", index.as_bytes());
        add(&format!("blobs/sha256/{lh}"), &layer);
        add(&format!("blobs/sha256/{ch}"), &config);
        add(&format!("blobs/sha256/{mh}"), manifest.as_bytes());
        builder.finish().unwrap();
        drop(builder);

        let plan = oci::plan(&path).unwrap();
        let order: Vec<&str> = plan
            .blobs
            .iter()
            .map(|b| b.descriptor.digest.as_str())
            .collect();
        assert_eq!(
            order,
            [
                format!("sha256:{ch}"),
                format!("sha256:{lh}"),
                format!("sha256:{mh}")
            ]
        );
        let manifest_blob = plan.blobs.last().unwrap();
        assert_eq!(
            manifest_blob.labels.get("containerd.io/gc.ref.content.l.0"),
            Some(&format!("sha256:{lh}"))
        );
        assert_eq!(plan.images.len(), 1);
        assert_eq!(plan.images[0].name, "example.com/test/app:1.0");

        // Each blob's offset points at its bytes.
        let bytes = std::fs::read(&path).unwrap();
        let layer_blob = &plan.blobs[1];
        let at = usize::try_from(layer_blob.offset).unwrap();
        assert_eq!(&bytes[at..at + layer.len()], layer.as_slice());
    }

    #[test]
    fn archives_that_are_not_oci_layouts_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tar");
        std::fs::write(&path, b"this is not a tar archive at all, just text").unwrap();
        let err = oci::plan(&path).unwrap_err().to_string();
        assert!(
            err.contains("not a readable tar") || err.contains("no index.json"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod replace_tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use keelson_configs::pki::Role;

    use super::oci::{Descriptor, NamedImage, may_import, replaced};

    fn named(name: &str, digest: &str) -> NamedImage {
        NamedImage {
            name: name.to_owned(),
            target: Descriptor {
                media_type: String::new(),
                digest: digest.to_owned(),
                size: 1,
                annotations: BTreeMap::new(),
            },
        }
    }

    fn existing(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(n, d)| ((*n).to_owned(), (*d).to_owned()))
            .collect()
    }

    #[test]
    fn only_an_admin_repoints_an_existing_name() {
        let archive = [
            named("docker.io/cilium/cilium:v1", "sha256:evil"),
            named("example.com/new:1", "sha256:new"),
            named("example.com/same:1", "sha256:same"),
        ];
        let present = existing(&[
            ("docker.io/cilium/cilium:v1", "sha256:good"),
            ("example.com/same:1", "sha256:same"),
            ("example.com/other:1", "sha256:x"),
        ]);
        assert_eq!(
            replaced(&archive, &present),
            vec!["docker.io/cilium/cilium:v1"]
        );
        let err = may_import(&archive, &present, "k8s.io", Role::Operator)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "permission denied: the archive would replace docker.io/cilium/cilium:v1 in containerd namespace \"k8s.io\" (they exist with another target); replacing an image needs role admin, your certificate has operator: import it under a new name or tag, or ask an admin"
        );
        may_import(&archive, &present, "k8s.io", Role::Admin).unwrap();
        // New names, and the same name with the same target, are the operator's to import.
        may_import(&archive[1..], &present, "k8s.io", Role::Operator).unwrap();
        may_import(&archive, &existing(&[]), "k8s.io", Role::Operator).unwrap();

        // A name pinned by digest is the operator's only when it is that digest.
        let pinned = [named("example.com/app@sha256:aaa", "sha256:aaa")];
        may_import(&pinned, &existing(&[]), "k8s.io", Role::Operator).unwrap();
        let lie = [named("example.com/app@sha256:aaa", "sha256:evil")];
        let err = may_import(&lie, &existing(&[]), "k8s.io", Role::Operator)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("names example.com/app@sha256:aaa but that image is sha256:evil")
                && err.contains("your certificate has operator"),
            "{err}"
        );
        may_import(&lie, &existing(&[]), "k8s.io", Role::Admin).unwrap();
    }
}
