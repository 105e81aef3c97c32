//! Checks of an action's shape before anything runs: directory entries
//! (names, sorting, duplicates) and the paths a Command names (outputs and
//! working directory), so nothing can write outside its workspace.

use std::collections::HashSet;
use std::path::{Component, Path};

use kiln_proto::reapi::{Digest, Directory};

use crate::error::{format_digest, RunError};

/// Checks one Directory's entries: valid names, each list sorted by name,
/// no name used twice across files, directories and symlinks.
pub fn check_directory(digest: &Digest, directory: &Directory) -> Result<(), RunError> {
    let invalid = |name: &str, why: &str| {
        RunError::InvalidArgument(format!(
            "directory {}: entry {name:?} {why}",
            format_digest(digest)
        ))
    };
    let mut seen = HashSet::new();
    let lists: [Vec<&str>; 3] = [
        directory.files.iter().map(|n| n.name.as_str()).collect(),
        directory
            .directories
            .iter()
            .map(|n| n.name.as_str())
            .collect(),
        directory.symlinks.iter().map(|n| n.name.as_str()).collect(),
    ];
    for names in lists {
        let mut previous: Option<&str> = None;
        for name in names {
            if name.is_empty() {
                return Err(invalid(name, "has an empty name"));
            }
            if name == "." || name == ".." {
                return Err(invalid(name, "is not a valid name"));
            }
            if name.contains('/') {
                return Err(invalid(name, "contains '/'"));
            }
            if name.contains('\0') {
                return Err(invalid(name, "contains NUL"));
            }
            if !seen.insert(name) {
                return Err(invalid(name, "appears more than once"));
            }
            if let Some(previous) = previous {
                if previous > name {
                    return Err(invalid(
                        name,
                        &format!("is not sorted (it follows {previous:?})"),
                    ));
                }
            }
            previous = Some(name);
        }
    }
    for node in &directory.files {
        if node.digest.is_none() {
            return Err(invalid(&node.name, "has no digest"));
        }
    }
    for node in &directory.directories {
        if node.digest.is_none() {
            return Err(invalid(&node.name, "has no digest"));
        }
    }
    Ok(())
}

/// Checks a relative path a Command names: not absolute, no NUL, and no
/// `..` that climbs above where it starts. `what` names the field.
pub fn check_relative_path(what: &str, path: &str) -> Result<(), RunError> {
    let invalid = |why: &str| RunError::InvalidArgument(format!("{what} {path:?} {why}"));
    if path.contains('\0') {
        return Err(invalid("contains NUL"));
    }
    let parsed = Path::new(path);
    if parsed.is_absolute() {
        return Err(invalid("is absolute; it must be relative to the workspace"));
    }
    let mut depth: usize = 0;
    for component in parsed.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| invalid("escapes the workspace through '..'"))?;
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(invalid("is absolute; it must be relative to the workspace"))
            }
        }
    }
    Ok(())
}

/// Checks an output path relative to the working directory: the two joined
/// must stay inside the workspace, and the output cannot be the workspace.
pub fn check_output_path(what: &str, working_directory: &str, path: &str) -> Result<(), RunError> {
    if Path::new(path).is_absolute() || path.contains('\0') {
        return check_relative_path(what, path);
    }
    let joined = if working_directory.is_empty() {
        path.to_string()
    } else {
        format!("{working_directory}/{path}")
    };
    check_relative_path(what, &joined).map_err(|_| {
        RunError::InvalidArgument(format!(
            "{what} {path:?} escapes the workspace through '..' (working directory {working_directory:?})"
        ))
    })?;
    let normalized = normalize(&joined);
    if normalized.is_empty() {
        return Err(RunError::InvalidArgument(format!(
            "{what} {path:?} names the workspace root itself"
        )));
    }
    Ok(())
}

/// `a/./b/../c` → `a/c`; the path must already be checked not to escape.
pub fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert!(check_relative_path("p", "a/b").is_ok());
        assert!(check_relative_path("p", "a/../b").is_ok());
        assert!(check_relative_path("p", "../b").is_err());
        assert!(check_relative_path("p", "a/../../b").is_err());
        assert!(check_relative_path("p", "/etc/passwd").is_err());
        assert!(check_output_path("p", "sub", "../x").is_ok());
        assert!(check_output_path("p", "sub", "../../x").is_err());
        assert!(check_output_path("p", "", ".").is_err());
        assert_eq!(normalize("a/./b/../c"), "a/c");
    }
}
