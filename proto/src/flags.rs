//! Parsing a service's flags the way its binary does, for tests and embedders that build a
//! service's configuration from a list of arguments instead of the command line.

/// Parses `args` (without the program name) as the flags of `C`, a `#[derive(clap::Args)]`
/// configuration, as the binary `program` would: `flags::parse::<Config>("claw-gateway",
/// ["--kind", "x=long"])`.
pub fn parse<C, I, T>(program: &'static str, args: I) -> Result<C, clap::Error>
where
    C: clap::Args + clap::FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let command = C::augment_args(clap::Command::new(program));
    let argv =
        std::iter::once(std::ffi::OsString::from(program)).chain(args.into_iter().map(Into::into));
    let mut matches = command.try_get_matches_from(argv)?;
    C::from_arg_matches_mut(&mut matches)
}
