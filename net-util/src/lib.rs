//! Host networking for virtio-net: tap devices and MAC addresses.

mod mac;
mod tap;

pub use mac::{MacAddr, MacParseError};
pub use tap::{Offloads, Tap, TapError, VNET_HDR_LEN};
