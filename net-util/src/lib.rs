//! Host networking for virtio-net: tap devices and MAC addresses.

mod tap;

pub use tap::{Offloads, Tap, TapError, RUNNING_TAP_IOCTLS, VNET_HDR_LEN};
/// MAC addresses are configuration values: they live with the configuration.
pub use vm_config::mac::{MacAddr, MacParseError};
