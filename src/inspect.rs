//! (being written)
pub fn cmd_inspect(_image: &std::path::Path, _json: bool) -> anyhow::Result<()> { anyhow::bail!("inspect: being written") }
