//! Users by name or number, read from the host's `/etc/passwd` directly
//! (no NSS), for the executor's action user and the sandbox's `dockerUser`.

use kiln_platform::DockerUser;

/// `user` as `(uid, gid)`: a name through `/etc/passwd`; a bare uid gets
/// its passwd group, or the gid equal to it when it has no entry. The
/// error names the user.
pub fn resolve(user: &DockerUser) -> Result<(u32, u32), String> {
    resolve_in(
        user,
        &std::fs::read_to_string("/etc/passwd").unwrap_or_default(),
    )
}

fn resolve_in(user: &DockerUser, passwd: &str) -> Result<(u32, u32), String> {
    match user {
        DockerUser::UidGid(uid, gid) => Ok((*uid, *gid)),
        DockerUser::Uid(uid) => Ok((
            *uid,
            entries(passwd)
                .find(|(_, u, _)| u == uid)
                .map_or(*uid, |(_, _, gid)| gid),
        )),
        DockerUser::Name(name) => entries(passwd)
            .find(|(n, _, _)| n == name)
            .map(|(_, uid, gid)| (uid, gid))
            .ok_or_else(|| format!("no user {name} in /etc/passwd (use a uid or uid:gid)")),
    }
}

fn entries(text: &str) -> impl Iterator<Item = (&str, u32, u32)> {
    text.lines().filter_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((name, uid, gid))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_uids_resolve_through_passwd() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\nbuild:x:1000:100::/home/build:/bin/sh\nbroken\n";
        let name = |n: &str| DockerUser::Name(n.into());
        assert_eq!(resolve_in(&name("build"), passwd), Ok((1000, 100)));
        assert_eq!(resolve_in(&DockerUser::Uid(1000), passwd), Ok((1000, 100)));
        assert_eq!(resolve_in(&DockerUser::Uid(4242), passwd), Ok((4242, 4242)));
        assert_eq!(resolve_in(&DockerUser::UidGid(7, 8), passwd), Ok((7, 8)));
        let missing = resolve_in(&name("ghost"), passwd).unwrap_err();
        assert!(missing.contains("ghost"), "{missing}");
    }
}
