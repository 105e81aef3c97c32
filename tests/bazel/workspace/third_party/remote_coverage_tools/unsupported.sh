#!/bin/bash
echo "coverage is not supported by this offline stand-in of @remote_coverage_tools" >&2
exit 1
