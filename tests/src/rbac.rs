//! What a service account may do, as `kubectl auth can-i --list` shows it, against what
//! docs/architecture.md documents for it.

use std::collections::BTreeSet;

use anyhow::{Context, ensure};

use crate::Cluster;
use crate::webhook::kubectl;

/// The rows of `kubectl auth can-i --list` in `ns` for `user` that an account with no binding
/// does not have (whitespace collapsed).
pub async fn can_i_beyond_baseline(
    cluster: &Cluster,
    ns: &str,
    user: &str,
) -> anyhow::Result<BTreeSet<String>> {
    let rows = |user: String| async move {
        let (ok, out, err) = kubectl(
            cluster,
            &["auth", "can-i", "--list", "-n", ns, "--as", &user],
            None,
        )
        .await?;
        ensure!(ok, "kubectl auth can-i --list as {user}: {err}");
        Ok::<_, anyhow::Error>(
            out.lines()
                .skip(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .filter(|l| !l.is_empty())
                .collect::<BTreeSet<String>>(),
        )
    };
    let all = rows(user.to_string()).await?;
    let baseline = rows(format!("system:serviceaccount:{ns}:no-binding-at-all")).await?;
    Ok(all.difference(&baseline).cloned().collect())
}

/// The rows docs/architecture.md shows for `account` (the block after `<!-- can-i: account -->`).
pub fn documented_can_i(account: &str) -> anyhow::Result<BTreeSet<String>> {
    let doc = include_str!("../../docs/architecture.md");
    let marker = format!("<!-- can-i: {account} -->");
    let after = doc
        .split_once(&marker)
        .with_context(|| format!("docs/architecture.md has no {marker}"))?
        .1;
    let block = after
        .split("```")
        .nth(1)
        .context("no code block after the marker")?;
    Ok(block
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty() && !l.starts_with("Resources"))
        .collect())
}

/// Fails, showing both, unless what `account` may do (with `rename` applied to each live row,
/// e.g. a test's own names back to the installed ones) is what the docs say.
pub async fn ensure_documented(
    cluster: &Cluster,
    ns: &str,
    account: &str,
    documented_as: &str,
    rename: impl Fn(String) -> String,
) -> anyhow::Result<()> {
    let user = format!("system:serviceaccount:{ns}:{account}");
    let shown: BTreeSet<String> = can_i_beyond_baseline(cluster, ns, &user)
        .await?
        .into_iter()
        .map(rename)
        .collect();
    let documented = documented_can_i(documented_as)?;
    let lines = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join("\n    ");
    ensure!(
        shown == documented,
        "kubectl auth can-i --list as {user} differs from docs/architecture.md (<!-- can-i: {documented_as} -->):\n  shown:\n    {}\n  documented:\n    {}",
        lines(&shown),
        lines(&documented)
    );
    Ok(())
}
