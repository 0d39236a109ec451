//! placeholder
use crate::*;
/// x
pub struct VhdxDisk;
impl VhdxDisk { pub(crate) fn open(_f: std::fs::File, _o: &OpenOptions) -> Result<Box<dyn DiskFile>> { todo!() } }
