//! End-to-end test support: one guest builder that boots built images under QEMU.
