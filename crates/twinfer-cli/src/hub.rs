//! `--model org/name[@revision]`: a model named on the Hugging Face Hub, fetched into the Hub's
//! standard cache (`$HF_HOME/hub`, else `~/.cache/huggingface/hub`, shared with the Python
//! tools), then loaded from there like a local folder. `org/name[@revision]/FILE.gguf` fetches
//! one GGUF file of a repository. A local file or folder of the same name wins.
//!
//! Once cached, a model loads with no network access: a file already in the cache for the
//! revision is not checked again (as `huggingface_hub` does with a pinned commit), and
//! `HF_HUB_OFFLINE=1` forbids the network outright. `HF_ENDPOINT` points at a mirror.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

/// Files a Hugging Face model folder may have beyond the weights: required, then optional.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 2] = ["tokenizer_config.json", "sentence_bert_config.json"];
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// A model named on the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HubName {
    repo: String,
    revision: String,
    /// One GGUF file of the repository, else the whole model folder.
    gguf: Option<String>,
}

/// The local path of `--model SPEC`: SPEC itself when it exists, else the Hub model it names,
/// fetched (or found in the cache).
pub fn resolve(spec: &Path) -> Result<PathBuf, String> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let Some(name) = spec.to_str().and_then(parse) else {
        return Err(format!("{}: no such file or folder (nor a Hub name such as org/name[@revision])", spec.display()));
    };
    fetch(&name).map_err(|e| format!("{}: not a local file or folder; from the Hugging Face Hub: {e}", spec.display()))
}

/// Whether `spec` has the form of a Hub name (it may still be a local path).
pub fn is_hub_name(spec: &str) -> bool {
    parse(spec).is_some()
}

/// `org/name`, `org/name@rev`, `org/name/FILE.gguf` or `org/name@rev/FILE.gguf`.
fn parse(spec: &str) -> Option<HubName> {
    let mut parts = spec.splitn(3, '/');
    let (org, rest, file) = (parts.next()?, parts.next()?, parts.next());
    let (name, revision) = match rest.split_once('@') {
        Some((n, r)) if !r.is_empty() => (n, r),
        Some(_) => return None,
        None => (rest, "main"),
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if !ok(org) || !ok(name) {
        return None;
    }
    let gguf = match file {
        Some(f) if f.to_ascii_lowercase().ends_with(".gguf") && !f.split('/').any(|p| p.is_empty() || p == "..") => {
            Some(f.to_string())
        }
        Some(_) => return None,
        None => None,
    };
    Some(HubName { repo: format!("{org}/{name}"), revision: revision.to_string(), gguf })
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
}

/// The model's local path: the GGUF file, or the snapshot folder holding the model's files.
fn fetch(name: &HubName) -> Result<PathBuf, String> {
    let repo = Repo::with_revision(name.repo.clone(), RepoType::Model, name.revision.clone());
    let cache = Cache::from_env();
    let repo_dir = cache.path().join(repo.folder_name());
    let cached = cache.repo(repo.clone());
    let offline = offline();
    let api = if offline {
        None
    } else {
        let api = ApiBuilder::from_env().with_progress(true).build().map_err(|e| e.to_string())?;
        Some(api.repo(repo))
    };
    // A file: from the cache when it is there, else downloaded; `None` when the repository has
    // no such file (only asked of optional files).
    let get = |file: &str, required: bool| -> Result<Option<PathBuf>, String> {
        if let Some(path) = cached.get(file) {
            return Ok(Some(path));
        }
        // An optional file the revision lacks is remembered as `huggingface_hub` does, so that a
        // cached model needs no request at all.
        let absent = commit(&repo_dir, &name.revision).map(|c| repo_dir.join(".no_exist").join(c).join(file));
        if !required && absent.as_ref().is_some_and(|p| p.exists()) {
            return Ok(None);
        }
        let Some(api) = &api else {
            return match required {
                true => Err(format!(
                    "{file} of {}@{} is not in the cache and HF_HUB_OFFLINE is set",
                    name.repo, name.revision
                )),
                false => Ok(None),
            };
        };
        let got =
            download(api, file, required).map_err(|e| format!("{file} of {}@{}: {e}", name.repo, name.revision))?;
        if got.is_none()
            && let Some(marker) = absent
            && let Some(dir) = marker.parent()
        {
            // Best effort: without the marker the next run asks again.
            let _ = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&marker, b""));
        }
        Ok(got)
    };
    if let Some(file) = &name.gguf {
        return get(file, true)?.ok_or_else(|| format!("{file}: missing"));
    }
    let config = get(REQUIRED[0], true)?.ok_or("config.json: missing")?;
    get(REQUIRED[1], true)?;
    for file in OPTIONAL {
        get(file, false)?;
    }
    match get(INDEX, false)? {
        Some(index) => {
            for shard in shards(&index)? {
                get(&shard, true)?;
            }
        }
        None => {
            get(SINGLE, true)?;
        }
    }
    // Every file of a revision lands in one snapshot folder (named by its commit).
    Ok(config.parent().map(Path::to_path_buf).unwrap_or(config))
}

/// The commit the cache maps `revision` to (written by the first download of the revision).
fn commit(repo_dir: &Path, revision: &str) -> Option<String> {
    let c = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
    let c = c.trim();
    (!c.is_empty() && c.chars().all(|x| x.is_ascii_alphanumeric())).then(|| c.to_string())
}

/// Downloads one file; a 404 on an optional one is its absence.
fn download(api: &ApiRepo, file: &str, required: bool) -> Result<Option<PathBuf>, String> {
    match api.download(file) {
        Ok(path) => Ok(Some(path)),
        Err(ApiError::RequestError(e)) if !required && matches!(*e, ureq::Error::Status(404, _)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The shard files a sharded checkpoint's index names, each once, in order.
fn shards(index: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index).map_err(|e| format!("{}: {e}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", index.display()))?;
    let map = json["weight_map"].as_object().ok_or_else(|| format!("{}: no weight_map", index.display()))?;
    let mut out: Vec<String> = Vec::new();
    for file in map.values() {
        let file =
            file.as_str().ok_or_else(|| format!("{}: a weight_map entry is not a file name", index.display()))?;
        // Shards sit beside the index: a name that climbs out of the repository is refused.
        if file.is_empty() || file.starts_with('/') || file.split('/').any(|p| p == "..") {
            return Err(format!("{}: shard name {file:?} leaves the repository", index.display()));
        }
        if !out.iter().any(|f| f == file) {
            out.push(file.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_parse_and_paths_do_not() {
        let n = parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
        assert_eq!(
            (n.repo.as_str(), n.revision.as_str(), n.gguf),
            ("HuggingFaceTB/SmolLM2-135M-Instruct", "main", None)
        );
        let n = parse("org/name@v1.0/model.Q4_1.gguf").unwrap();
        assert_eq!(
            (n.repo.as_str(), n.revision.as_str(), n.gguf.as_deref()),
            ("org/name", "v1.0", Some("model.Q4_1.gguf"))
        );
        let n = parse("org/name/sub/x.gguf").unwrap();
        assert_eq!(n.gguf.as_deref(), Some("sub/x.gguf"));
        for bad in [
            "name",
            "/abs/path",
            "./org/name",
            "../x/y",
            "org/",
            "org/name@",
            "org/name/config.json",
            "org/na me",
            "org/name/../x.gguf",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
