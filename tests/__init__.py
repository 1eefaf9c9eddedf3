"""mlo's test suite, a package so that its modules import the shared helpers (`tests.helpers`) by an
ordinary relative import."""
