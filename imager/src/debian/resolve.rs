//! Dependency resolution over one `Packages` index: the closure of the requested
//! packages under `Pre-Depends` and `Depends`, never choosing an excluded package.
//!
//! Rules, in order, for each dependency of a chosen package:
//! 1. if an already chosen package satisfies any alternative (by name and version, or
//!    through `Provides`), nothing more is chosen;
//! 2. otherwise the first alternative that a non-excluded package satisfies wins: the
//!    real package of that name (its highest satisfying version), else the first
//!    provider in name order;
//! 3. if only excluded packages could satisfy it, the dependency is dropped and
//!    recorded as [`ExcludedDependency`], so the lock shows what the image lacks;
//! 4. if nothing satisfies it, resolution fails.
//!
//! `Recommends` and `Suggests` are ignored. Architecture qualifiers (`:any`) are moot
//! in a single-architecture image. `Conflicts`/`Breaks` are not checked: the package
//! set is small, explicit and reviewed through the lock file.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use super::index::{Dependency, Index, Package, Relation};

/// A resolution failure.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A requested package is not in the index.
    #[error("unknown package `{name}` in {location}{}; fix the name or remove it", suggestion(.did_you_mean))]
    UnknownPackage {
        /// The requested name.
        name: String,
        /// Where it was requested (`images/keelson.toml:12:3`).
        location: String,
        /// The closest real package name, if one is close.
        did_you_mean: Option<String>,
    },
    /// A requested package is also on the exclude list.
    #[error(
        "package `{name}` requested in {location} is excluded ({reason}); remove it from the packages or from the exclude list"
    )]
    RequestedExcluded {
        /// The package.
        name: String,
        /// Where it was requested.
        location: String,
        /// Why it is excluded.
        reason: String,
    },
    /// A metapackage has no dependency to follow.
    #[error(
        "package `{name}` requested as a metapackage in {location} depends on nothing; request the real package instead"
    )]
    EmptyMetapackage {
        /// The package.
        name: String,
        /// Where it was requested.
        location: String,
    },
    /// A dependency cannot be satisfied by any package of the index.
    #[error(
        "dependency `{dependency}` of `{required_by}` is satisfied by no package of the index; the suite may be inconsistent, or exclude `{required_by}`'s requester"
    )]
    Unsatisfiable {
        /// The dependency as written.
        dependency: String,
        /// The package that has it.
        required_by: String,
    },
    /// Two packages need different versions of one package.
    #[error(
        "`{required_by}` needs `{dependency}`, but `{name}` {chosen} was already chosen; the index is inconsistent"
    )]
    Conflict {
        /// The package name.
        name: String,
        /// The version already chosen.
        chosen: String,
        /// The dependency that wants another version.
        dependency: String,
        /// The package that has it.
        required_by: String,
    },
}

fn suggestion(name: &Option<String>) -> String {
    match name {
        Some(n) => format!("; did you mean `{n}`?"),
        None => String::new(),
    }
}

/// A package the definition asks for.
#[derive(Debug, Clone)]
pub struct Request {
    /// The package name.
    pub name: String,
    /// Whether to take its dependencies (`false`: its files only).
    pub deps: bool,
    /// Take the packages its `Depends` name instead of the package itself (the
    /// kernel metapackage `linux-image-amd64` names the versioned kernel package).
    pub metapackage: bool,
    /// Where it was requested, for errors (`images/keelson.toml:12:3`).
    pub location: String,
    /// Why it is in the image, as the lock file records it (`requested`, `kernel`).
    pub why: String,
}

/// A package (or virtual package) the resolver must never choose.
#[derive(Debug, Clone)]
pub struct Exclusion {
    /// The package or virtual package name.
    pub name: String,
    /// Why, recorded in the lock next to each dependency it drops.
    pub reason: String,
}

/// A chosen package.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The package, as the index describes it.
    pub package: Package,
    /// `requested`, `kernel (via linux-image-amd64 6.12...)` or `dependency of a, b`.
    pub why: String,
}

/// A dependency dropped because only excluded packages satisfy it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExcludedDependency {
    /// The excluded package (or virtual package) name.
    pub name: String,
    /// The package whose dependency it was.
    pub required_by: String,
    /// The exclusion's reason.
    pub reason: String,
}

/// The outcome of resolution, sorted by name.
#[derive(Debug, Clone)]
pub struct Resolution {
    /// The chosen packages.
    pub packages: Vec<Resolved>,
    /// The dependencies dropped by exclusions.
    pub excluded: Vec<ExcludedDependency>,
}

struct Chosen {
    index: usize,
    requested: Option<String>,
    required_by: BTreeSet<String>,
    deps: bool,
}

struct Resolver<'a> {
    index: &'a Index,
    excluded: BTreeMap<&'a str, &'a str>,
    chosen: BTreeMap<String, Chosen>,
    queue: VecDeque<String>,
    dropped: BTreeSet<ExcludedDependency>,
}

/// Resolve `requests` against `index`, never choosing a package in `exclusions`.
pub fn resolve(
    index: &Index,
    requests: &[Request],
    exclusions: &[Exclusion],
) -> Result<Resolution, ResolveError> {
    let mut r = Resolver {
        index,
        excluded: exclusions
            .iter()
            .map(|e| (e.name.as_str(), e.reason.as_str()))
            .collect(),
        chosen: BTreeMap::new(),
        queue: VecDeque::new(),
        dropped: BTreeSet::new(),
    };
    for req in requests {
        r.request(req)?;
    }
    while let Some(name) = r.queue.pop_front() {
        let Some(chosen) = r.chosen.get(&name) else {
            continue;
        };
        let pkg = index.get(chosen.index);
        for dep in pkg.pre_depends.iter().chain(&pkg.depends) {
            r.depend(&name, dep)?;
        }
    }
    let packages = r
        .chosen
        .values()
        .map(|c| {
            let why = match &c.requested {
                Some(why) => why.clone(),
                None => format!(
                    "dependency of {}",
                    c.required_by.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            };
            Resolved {
                package: index.get(c.index).clone(),
                why,
            }
        })
        .collect();
    Ok(Resolution {
        packages,
        excluded: r.dropped.into_iter().collect(),
    })
}

impl<'a> Resolver<'a> {
    fn request(&mut self, req: &Request) -> Result<(), ResolveError> {
        if let Some(reason) = self.excluded.get(req.name.as_str()) {
            return Err(ResolveError::RequestedExcluded {
                name: req.name.clone(),
                location: req.location.clone(),
                reason: reason.to_string(),
            });
        }
        let relation = Relation {
            name: req.name.clone(),
            constraint: None,
        };
        let Some(i) = self.candidate(&relation).ok() else {
            return Err(ResolveError::UnknownPackage {
                name: req.name.clone(),
                location: req.location.clone(),
                did_you_mean: self.closest(&req.name),
            });
        };
        if !req.metapackage {
            return self.choose(i, Some(req.why.clone()), None, req.deps, &relation);
        }
        let meta = self.index.get(i);
        if meta.depends.is_empty() && meta.pre_depends.is_empty() {
            return Err(ResolveError::EmptyMetapackage {
                name: req.name.clone(),
                location: req.location.clone(),
            });
        }
        let why = format!("{} (via {} {})", req.why, meta.name, meta.version);
        for dep in meta.pre_depends.iter().chain(&meta.depends) {
            match self.pick(dep) {
                Pick::Package(j, rel) => self.choose(j, Some(why.clone()), None, req.deps, rel)?,
                Pick::Excluded(name, reason) => {
                    self.dropped.insert(ExcludedDependency {
                        name,
                        required_by: meta.name.clone(),
                        reason,
                    });
                }
                Pick::Nothing => {
                    return Err(ResolveError::Unsatisfiable {
                        dependency: dep.to_string(),
                        required_by: meta.name.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn depend(&mut self, from: &str, dep: &Dependency) -> Result<(), ResolveError> {
        if let Some(name) = self.satisfied(dep) {
            if name != from
                && let Some(c) = self.chosen.get_mut(&name)
            {
                c.required_by.insert(from.to_string());
                if !c.deps {
                    // Taken "files only" on request, but another package needs it whole.
                    c.deps = true;
                    self.queue.push_back(name);
                }
            }
            return Ok(());
        }
        match self.pick(dep) {
            Pick::Package(i, rel) => self.choose(i, None, Some(from), true, rel),
            Pick::Excluded(name, reason) => {
                self.dropped.insert(ExcludedDependency {
                    name,
                    required_by: from.to_string(),
                    reason,
                });
                Ok(())
            }
            Pick::Nothing => Err(ResolveError::Unsatisfiable {
                dependency: dep.to_string(),
                required_by: from.to_string(),
            }),
        }
    }

    fn choose(
        &mut self,
        i: usize,
        requested: Option<String>,
        required_by: Option<&str>,
        deps: bool,
        relation: &Relation,
    ) -> Result<(), ResolveError> {
        let pkg = self.index.get(i);
        if let Some(c) = self.chosen.get_mut(&pkg.name) {
            if c.index != i {
                let have = self.index.get(c.index);
                return Err(ResolveError::Conflict {
                    name: pkg.name.clone(),
                    chosen: have.version.to_string(),
                    dependency: relation.to_string(),
                    required_by: required_by.unwrap_or("the definition").to_string(),
                });
            }
            if c.requested.is_none() {
                c.requested = requested;
            }
            c.required_by.extend(required_by.map(str::to_string));
            if deps && !c.deps {
                c.deps = true;
                self.queue.push_back(pkg.name.clone());
            }
            return Ok(());
        }
        self.chosen.insert(
            pkg.name.clone(),
            Chosen {
                index: i,
                requested,
                required_by: required_by.map(str::to_string).into_iter().collect(),
                deps,
            },
        );
        if deps {
            self.queue.push_back(pkg.name.clone());
        }
        Ok(())
    }

    /// The chosen package that satisfies `dep`, if any.
    fn satisfied(&self, dep: &Dependency) -> Option<String> {
        for rel in &dep.0 {
            if let Some(c) = self.chosen.get(&rel.name)
                && rel.accepts(Some(&self.index.get(c.index).version))
            {
                return Some(rel.name.clone());
            }
            for &p in self.index.providers(&rel.name) {
                let pkg = self.index.get(p);
                if self.chosen.get(&pkg.name).is_some_and(|c| c.index == p) && provides(pkg, rel) {
                    return Some(pkg.name.clone());
                }
            }
        }
        None
    }

    /// The package to choose for `dep`, or why there is none.
    fn pick<'d>(&self, dep: &'d Dependency) -> Pick<'d> {
        let mut excluded = None;
        for rel in &dep.0 {
            match self.candidate(rel) {
                Ok(i) => return Pick::Package(i, rel),
                Err(Some(e)) if excluded.is_none() => excluded = Some(e),
                Err(_) => {}
            }
        }
        match excluded {
            Some((name, reason)) => Pick::Excluded(name, reason),
            None => Pick::Nothing,
        }
    }

    /// The best non-excluded package satisfying `rel`; on failure, the exclusion that
    /// stood in the way, if one did.
    fn candidate(&self, rel: &Relation) -> Result<usize, Option<(String, String)>> {
        if let Some(reason) = self.excluded.get(rel.name.as_str()) {
            return Err(Some((rel.name.clone(), reason.to_string())));
        }
        let real = self
            .index
            .named(&rel.name)
            .iter()
            .copied()
            .filter(|&i| rel.accepts(Some(&self.index.get(i).version)))
            .max_by(|&a, &b| self.index.get(a).version.cmp(&self.index.get(b).version));
        if let Some(i) = real {
            return Ok(i);
        }
        let mut providers: Vec<usize> = self
            .index
            .providers(&rel.name)
            .iter()
            .copied()
            .filter(|&i| provides(self.index.get(i), rel))
            .collect();
        providers.sort_by(|&a, &b| {
            let (pa, pb) = (self.index.get(a), self.index.get(b));
            pa.name.cmp(&pb.name).then(pb.version.cmp(&pa.version))
        });
        let mut blocked = None;
        for i in providers {
            let name = &self.index.get(i).name;
            match self.excluded.get(name.as_str()) {
                None => return Ok(i),
                Some(reason) if blocked.is_none() => {
                    blocked = Some((name.clone(), reason.to_string()));
                }
                Some(_) => {}
            }
        }
        Err(blocked)
    }

    /// The real package name closest to `name`, if it is close enough to be a typo.
    fn closest(&self, name: &str) -> Option<String> {
        let limit = (name.len() / 3).max(2);
        let seen: HashSet<&str> = self.index.names().collect();
        seen.into_iter()
            .map(|n| (strsim::levenshtein(name, n), n))
            .filter(|(d, _)| *d <= limit)
            .min()
            .map(|(_, n)| n.to_string())
    }
}

enum Pick<'d> {
    Package(usize, &'d Relation),
    Excluded(String, String),
    Nothing,
}

/// Whether `pkg`'s `Provides` satisfy `rel`.
fn provides(pkg: &Package, rel: &Relation) -> bool {
    pkg.provides
        .iter()
        .any(|p| p.name == rel.name && rel.accepts(p.version.as_ref()))
}
