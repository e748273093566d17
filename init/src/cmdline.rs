//! The boot parameters stage 1 reads from the kernel command line: the slot and its
//! dm-verity parameters (keys from `keelson_configs::layout`), checked strictly, since a
//! root that cannot be verified must not be mounted.

use keelson_configs::layout::{
    CMDLINE_SLOT, CMDLINE_VERITY_CHECK, CMDLINE_VERITY_DATA_BLOCKS, CMDLINE_VERITY_HASH_OFFSET,
    CMDLINE_VERITY_ROOTHASH, CMDLINE_VERITY_SALT, Slot, VERITY_BLOCK_SIZE, cmdline_value,
    parse_cmdline,
};

use crate::dm::VerityParams;

/// Errors in the boot parameters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A required key is absent.
    #[error(
        "the kernel command line has no {key}=: this boot entry does not carry the slot's verity parameters, so its root cannot be verified"
    )]
    Missing {
        /// The key.
        key: &'static str,
    },
    /// A key has a value we cannot use.
    #[error("the kernel command line has {key}={value:?}: {expected}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
}

/// How much of the root stage 1 verifies before switching to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerityCheck {
    /// Read the whole root through dm-verity once: a corrupt root never runs.
    Full,
    /// Only blocks that are read are checked (faster boot; corruption shows up as EIO).
    Lazy,
}

/// What stage 1 needs to know to boot a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    /// The slot to boot.
    pub slot: Slot,
    /// Its verity parameters.
    pub verity: VerityParams,
    /// How much to verify up front.
    pub check: VerityCheck,
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.len().is_multiple_of(2) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn number(args: &[(String, String)], key: &'static str) -> Result<u64, Error> {
    let value = cmdline_value(args, key).ok_or(Error::Missing { key })?;
    value.parse().map_err(|_| Error::Invalid {
        key,
        value: value.to_string(),
        expected: "a decimal number",
    })
}

/// The slot named on a command line, if any (stage 2 prints it even without verity keys).
pub fn slot(cmdline: &str) -> Option<Slot> {
    cmdline_value(&parse_cmdline(cmdline), CMDLINE_SLOT).and_then(Slot::parse)
}

/// Parse and check the boot parameters from the text of `/proc/cmdline`.
pub fn parse(cmdline: &str) -> Result<BootParams, Error> {
    let args = parse_cmdline(cmdline);
    let slot_value =
        cmdline_value(&args, CMDLINE_SLOT).ok_or(Error::Missing { key: CMDLINE_SLOT })?;
    let slot = Slot::parse(slot_value).ok_or(Error::Invalid {
        key: CMDLINE_SLOT,
        value: slot_value.to_string(),
        expected: "a or b",
    })?;
    let root_hash = cmdline_value(&args, CMDLINE_VERITY_ROOTHASH).ok_or(Error::Missing {
        key: CMDLINE_VERITY_ROOTHASH,
    })?;
    if root_hash.len() != 64 || !is_hex(root_hash) {
        return Err(Error::Invalid {
            key: CMDLINE_VERITY_ROOTHASH,
            value: root_hash.to_string(),
            expected: "a sha256 root hash (64 hex digits)",
        });
    }
    let salt = cmdline_value(&args, CMDLINE_VERITY_SALT).ok_or(Error::Missing {
        key: CMDLINE_VERITY_SALT,
    })?;
    let salt = if salt == "-" { "" } else { salt };
    if !salt.is_empty() && (!is_hex(salt) || salt.len() > 512) {
        return Err(Error::Invalid {
            key: CMDLINE_VERITY_SALT,
            value: salt.to_string(),
            expected: "hex digits (or - for no salt)",
        });
    }
    let data_blocks = number(&args, CMDLINE_VERITY_DATA_BLOCKS)?;
    if data_blocks == 0 {
        return Err(Error::Invalid {
            key: CMDLINE_VERITY_DATA_BLOCKS,
            value: "0".to_string(),
            expected: "at least one 4096-byte block",
        });
    }
    let hash_offset = number(&args, CMDLINE_VERITY_HASH_OFFSET)?;
    if !hash_offset.is_multiple_of(VERITY_BLOCK_SIZE)
        || data_blocks
            .checked_mul(VERITY_BLOCK_SIZE)
            .is_none_or(|data_end| hash_offset < data_end)
    {
        return Err(Error::Invalid {
            key: CMDLINE_VERITY_HASH_OFFSET,
            value: hash_offset.to_string(),
            expected: "a multiple of 4096 at or after the end of the data blocks",
        });
    }
    let check = match cmdline_value(&args, CMDLINE_VERITY_CHECK) {
        None | Some("full") => VerityCheck::Full,
        Some("lazy") => VerityCheck::Lazy,
        Some(other) => {
            return Err(Error::Invalid {
                key: CMDLINE_VERITY_CHECK,
                value: other.to_string(),
                expected: "full or lazy",
            });
        }
    };
    Ok(BootParams {
        slot,
        verity: VerityParams {
            root_hash: root_hash.to_ascii_lowercase(),
            salt: salt.to_ascii_lowercase(),
            data_blocks,
            hash_offset,
        },
        check,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn good() -> String {
        format!(
            "console=ttyS0 keelson.slot=a keelson.verity.roothash={HASH} \
             keelson.verity.salt=00ff keelson.verity.data_blocks=10 \
             keelson.verity.hash_offset=40960"
        )
    }

    fn check(cmdline: &str, expected: Result<(), &str>) {
        let got = parse(cmdline).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(got, expected.map_err(str::to_string), "{cmdline}");
    }

    #[test]
    fn a_complete_command_line_parses() -> Result<(), Error> {
        let p = parse(&good())?;
        assert_eq!(p.slot, Slot::A);
        assert_eq!(p.check, VerityCheck::Full);
        assert_eq!(p.verity.root_hash, HASH);
        assert_eq!(p.verity.salt, "00ff");
        assert_eq!(p.verity.data_blocks, 10);
        assert_eq!(p.verity.hash_offset, 40960);
        let lazy = parse(&format!(
            "{} keelson.verity.check=lazy keelson.slot=B",
            good()
        ))?;
        assert_eq!((lazy.slot, lazy.check), (Slot::B, VerityCheck::Lazy));
        Ok(())
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        check(
            "console=ttyS0 keelson.slot=a",
            Err(
                "the kernel command line has no keelson.verity.roothash=: this boot entry does not carry the slot's verity parameters, so its root cannot be verified",
            ),
        );
        check(
            &good().replace("keelson.slot=a", ""),
            Err(
                "the kernel command line has no keelson.slot=: this boot entry does not carry the slot's verity parameters, so its root cannot be verified",
            ),
        );
        check(
            &good().replace("keelson.slot=a", "keelson.slot=c"),
            Err("the kernel command line has keelson.slot=\"c\": a or b"),
        );
        check(
            &format!("{} keelson.verity.roothash=abc", good()),
            Err(
                "the kernel command line has keelson.verity.roothash=\"abc\": a sha256 root hash (64 hex digits)",
            ),
        );
        check(
            &format!("{} keelson.verity.data_blocks=x", good()),
            Err("the kernel command line has keelson.verity.data_blocks=\"x\": a decimal number"),
        );
        check(
            &format!("{} keelson.verity.hash_offset=4096", good()),
            Err(
                "the kernel command line has keelson.verity.hash_offset=\"4096\": a multiple of 4096 at or after the end of the data blocks",
            ),
        );
        check(
            &format!("{} keelson.verity.check=some", good()),
            Err("the kernel command line has keelson.verity.check=\"some\": full or lazy"),
        );
        check(&format!("{} keelson.verity.salt=-", good()), Ok(()));
    }
}
