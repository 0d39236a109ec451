//! `--tpm socket=<path>`: a TPM 2.0 (CRB interface) whose commands go to `swtpm` through its
//! control socket `path` (docs/platform.md).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{ConfigError, OptionParser};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmConfig {
    /// swtpm's control socket (`swtpm socket --ctrl type=unixio,path=<socket>`).
    pub socket: PathBuf,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

impl TpmConfig {
    pub const OPTION: &'static str = "--tpm";

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(Self::OPTION, raw, &["socket"], &[])?;
        let socket = p
            .get("socket")
            .ok_or_else(|| p.error("socket= is required (swtpm's control socket)"))?;
        let c = TpmConfig {
            socket: PathBuf::from(socket),
            extra: Default::default(),
        };
        c.validate()?;
        Ok(c)
    }

    /// What `parse` checks, for a configuration that came as JSON too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.extra.check("tpm")?;
        if self.socket.as_os_str().is_empty() {
            return Err(ConfigError::new(
                Self::OPTION,
                "",
                "socket= is required (swtpm's control socket)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_originals_syntax_and_json() {
        let c = TpmConfig::parse("socket=/run/swtpm.sock").unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/swtpm.sock"));
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"socket":"/run/swtpm.sock"}"#
        );
        let j: TpmConfig = serde_json::from_str(r#"{"socket": "/t"}"#).unwrap();
        j.validate().unwrap();
        for bad in ["", "socket=", "path=/t", "socket=/t,x=1"] {
            assert!(TpmConfig::parse(bad).is_err(), "{bad}");
        }
        let j: TpmConfig = serde_json::from_str(r#"{"socket": ""}"#).unwrap();
        assert!(j.validate().is_err());
    }
}
