//! The options of a received message that the client reads, sifted out of its bytes
//! before `dhcproto` decodes them.
//!
//! `dhcproto` decodes every option it knows, and some of its decoders assert on the
//! option's length (`debug_assert!`: Rapid Commit, Client FQDN, Client Network Interface,
//! the bulk lease query times), which a test or debug build of PID 1 turns into a panic
//! on one packet from any host on the link. The client reads only the options it asks
//! for and the message type, so only those reach the decoder: the rest are dropped
//! unread, whatever their length says.

use dhcproto::v4::{MAGIC, OptionCode};

use super::WANTED;

/// The fixed BOOTP header before the magic cookie.
const HEADER: usize = 236;
/// The pad option: one byte, no length.
const PAD: u8 = 0;
/// The end option: one byte, no length.
const END: u8 = 255;

/// Whether the client reads option `code` of a message it receives.
fn read_by_client(code: u8) -> bool {
    let code = OptionCode::from(code);
    code == OptionCode::MessageType || WANTED.contains(&code)
}

/// `bytes` with only the options the client reads, in their order (a split option's
/// pieces included), and an end option; `None` when it is not a DHCP message (shorter
/// than the header, or without the magic cookie). An option cut short by the end of the
/// bytes ends the options, as `dhcproto` ends them at one it cannot read.
pub(super) fn options_read(bytes: &[u8]) -> Option<Vec<u8>> {
    let start = HEADER + MAGIC.len();
    if bytes.get(HEADER..start)? != MAGIC {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len().min(start + 512) + 1);
    out.extend_from_slice(&bytes[..start]);
    let mut rest = &bytes[start..];
    loop {
        match rest {
            [PAD, tail @ ..] => rest = tail,
            [code, len, tail @ ..] if *code != END => {
                let Some(value) = tail.get(..usize::from(*len)) else {
                    break;
                };
                if read_by_client(*code) {
                    out.extend_from_slice(&[*code, *len]);
                    out.extend_from_slice(value);
                }
                rest = &tail[value.len()..];
            }
            _ => break,
        }
    }
    out.push(END);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(options: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER];
        bytes[0] = 2;
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(options);
        bytes
    }

    #[test]
    fn only_the_options_the_client_reads_are_kept() {
        // Message type, a bulk lease query time (153, unread), pads, a router, a split
        // domain name, and bytes after the end.
        let options = [
            53, 1, 5, 153, 4, 0, 0, 0, 1, 0, 0, 3, 4, 10, 0, 0, 1, 15, 1, b'a', 15, 1, b'b', 255,
            12, 1, b'x',
        ];
        let expected = message(&[53, 1, 5, 3, 4, 10, 0, 0, 1, 15, 1, b'a', 15, 1, b'b', 255]);
        assert_eq!(options_read(&message(&options)), Some(expected));
    }

    #[test]
    fn a_cut_option_ends_them_and_non_dhcp_is_refused() {
        assert_eq!(
            options_read(&message(&[53, 1, 2, 3, 8, 10, 0])),
            Some(message(&[53, 1, 2, 255]))
        );
        assert_eq!(options_read(&message(&[53])), Some(message(&[255])));
        assert_eq!(options_read(&message(&[])), Some(message(&[255])));
        let mut no_magic = message(&[53, 1, 2]);
        no_magic[HEADER] = 0;
        assert_eq!(options_read(&no_magic), None);
        assert_eq!(options_read(&[2; HEADER + 3]), None);
    }
}
