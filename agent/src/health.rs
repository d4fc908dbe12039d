//! Which XIDs make a GPU unhealthy. A GPU is unhealthy while a critical XID is active on it and
//! healthy again once none is (the backends decide when an XID stops being active).

use std::collections::BTreeSet;

/// XIDs NVIDIA's device plugin ignores by default: application errors, not GPU faults.
pub const DEFAULT_IGNORED_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

#[derive(Debug, Clone, PartialEq)]
pub struct HealthRules {
    pub ignored_xids: BTreeSet<u64>,
    /// `false` turns health checking off (NVIDIA's `DP_DISABLE_HEALTHCHECKS=all`).
    pub enabled: bool,
}

impl Default for HealthRules {
    fn default() -> Self {
        HealthRules {
            ignored_xids: DEFAULT_IGNORED_XIDS.into_iter().collect(),
            enabled: true,
        }
    }
}

/// An `--ignore-xids` entry that is not a number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not an XID number; give a comma-separated list such as 48,79")]
pub struct NotAnXid(pub String);

impl HealthRules {
    /// Default ignored XIDs plus `extra` (NVIDIA's `DP_DISABLE_HEALTHCHECKS=xids:...` spelling is
    /// accepted too: `all` turns checking off, `xids` is a prefix).
    pub fn with_extra(extra: &str) -> Result<HealthRules, NotAnXid> {
        let mut rules = HealthRules::default();
        for part in extra.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if part == "all" {
                rules.enabled = false;
                continue;
            }
            let n = part.trim_start_matches("xids").trim_start_matches(':');
            let xid = n.parse::<u64>().map_err(|_| NotAnXid(part.to_string()))?;
            rules.ignored_xids.insert(xid);
        }
        Ok(rules)
    }

    pub fn is_healthy(&self, active_xids: &[u64]) -> bool {
        !self.enabled || active_xids.iter().all(|x| self.ignored_xids.contains(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn critical_xids_count_ignored_ones_do_not() {
        let r = HealthRules::default();
        assert!(r.is_healthy(&[]));
        assert!(r.is_healthy(&[13, 43]));
        assert!(!r.is_healthy(&[79]));
        let r = HealthRules::with_extra("xids:79, 48").unwrap();
        assert!(r.is_healthy(&[79, 48]));
        assert!(HealthRules::with_extra("x").is_err());
        assert!(HealthRules::with_extra("all").unwrap().is_healthy(&[79]));
    }
}
