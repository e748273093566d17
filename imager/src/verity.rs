//! The dm-verity hash tree of a root filesystem: built by `keelson_upgrade::verity`
//! (shared with machined, which verifies an upgraded slot against it), re-exported here
//! for the image build.

pub use keelson_upgrade::verity::*;

/// The parameters [`build`] returns, under the name the image build has used for them.
pub type VerityParams = TreeParams;
