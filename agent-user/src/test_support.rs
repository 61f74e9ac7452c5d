//! Helpers shared by the crate's unit tests.

/// Fails the test unless it runs as root: `needs` says what for. A test that needs root never
/// passes by skipping its assertions (the test suite and CI run as root).
pub(crate) fn require_root(needs: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root ({needs}); run the test suite as root (`sudo cargo xtask test`)"
    );
}
