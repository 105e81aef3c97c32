//! What a caller may do: five capabilities, named as `kiln keys create
//! --capability` takes them, and a small set of them.

use std::fmt;

/// One thing a key allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Capability {
    /// Read the CAS and the Action Cache (FindMissingBlobs included).
    CacheRead,
    /// Upload to the CAS.
    CasWrite,
    /// Write Action Cache entries (UpdateActionResult).
    AcWrite,
    /// Execute actions, and follow or cancel operations.
    Execute,
    /// Register as an executor and take actions.
    RegisterExecutor,
}

impl Capability {
    pub const ALL: [Capability; 5] = [
        Capability::CacheRead,
        Capability::CasWrite,
        Capability::AcWrite,
        Capability::Execute,
        Capability::RegisterExecutor,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Capability::CacheRead => "cache-read",
            Capability::CasWrite => "cas-write",
            Capability::AcWrite => "ac-write",
            Capability::Execute => "execute",
            Capability::RegisterExecutor => "register-executor",
        }
    }

    pub fn from_name(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of capabilities.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities(u8);

impl Capabilities {
    /// What a key gets when `kiln keys create` is not told: a developer's
    /// machine reads the cache, uploads inputs and executes, but cannot
    /// write Action Cache entries that every later build would trust.
    pub const DEVELOPER: Capabilities = Capabilities(
        (1 << Capability::CacheRead as u8)
            | (1 << Capability::CasWrite as u8)
            | (1 << Capability::Execute as u8),
    );

    pub fn all() -> Capabilities {
        Capability::ALL.into_iter().collect()
    }

    pub fn has(self, capability: Capability) -> bool {
        self.0 & capability.bit() != 0
    }

    pub fn with(self, capability: Capability) -> Capabilities {
        Capabilities(self.0 | capability.bit())
    }

    pub fn without(self, capability: Capability) -> Capabilities {
        Capabilities(self.0 & !capability.bit())
    }

    /// With what the capabilities need to be of use: an executor
    /// (`register-executor`) reads inputs from and writes outputs to the
    /// CAS, so it gets `cache-read` and `cas-write` too.
    pub fn with_implied(self) -> Capabilities {
        match self.has(Capability::RegisterExecutor) {
            true => self.with(Capability::CacheRead).with(Capability::CasWrite),
            false => self,
        }
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Capability> {
        Capability::ALL.into_iter().filter(move |c| self.has(*c))
    }

    /// `cache-read,cas-write`: names separated by commas (spaces allowed);
    /// an unknown name is an error listing the known ones.
    pub fn parse_list(text: &str) -> Result<Capabilities, String> {
        let mut set = Capabilities::default();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let capability = Capability::from_name(name).ok_or_else(|| {
                format!(
                    "unknown capability {name:?}; the capabilities are {}",
                    Capabilities::all()
                )
            })?;
            set = set.with(capability);
        }
        if set.is_empty() {
            return Err(format!(
                "no capability given; the capabilities are {}",
                Capabilities::all()
            ));
        }
        Ok(set)
    }
}

impl FromIterator<Capability> for Capabilities {
    fn from_iter<I: IntoIterator<Item = Capability>>(iter: I) -> Capabilities {
        iter.into_iter()
            .fold(Capabilities::default(), Capabilities::with)
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Capability::name).collect();
        f.write_str(&names.join(","))
    }
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Capabilities({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_print_back() {
        let set = Capabilities::parse_list("execute, cache-read").unwrap();
        assert!(set.has(Capability::Execute) && set.has(Capability::CacheRead));
        assert!(!set.has(Capability::AcWrite));
        assert_eq!(set.to_string(), "cache-read,execute");
        assert_eq!(
            Capabilities::parse_list(&Capabilities::all().to_string()).unwrap(),
            Capabilities::all()
        );
        let error = Capabilities::parse_list("cache-read,admin").unwrap_err();
        assert!(error.contains("\"admin\"") && error.contains("register-executor"));
        assert!(Capabilities::parse_list(" , ").is_err());
    }

    #[test]
    fn an_executor_key_reads_and_writes_the_cas() {
        let executor = Capabilities::parse_list("register-executor")
            .unwrap()
            .with_implied();
        assert_eq!(
            executor.to_string(),
            "cache-read,cas-write,register-executor"
        );
        assert_eq!(
            Capabilities::DEVELOPER.with_implied(),
            Capabilities::DEVELOPER
        );
    }

    #[test]
    fn developer_keys_cannot_write_the_action_cache() {
        assert!(!Capabilities::DEVELOPER.has(Capability::AcWrite));
        assert!(!Capabilities::DEVELOPER.has(Capability::RegisterExecutor));
        assert!(Capabilities::DEVELOPER.has(Capability::CasWrite));
    }
}
