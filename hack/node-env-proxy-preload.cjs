// Makes Node's global fetch honour HTTPS_PROXY / HTTP_PROXY / NO_PROXY on Node versions whose
// fetch ignores them (Node 20; Node >= 22.21 and 24 have NODE_USE_ENV_PROXY=1 instead).
// Loaded with NODE_OPTIONS="--require /path/to/this/file"; needs the npm package `undici`
// (6.x) on NODE_PATH. The sandbox's own code stays unchanged.
'use strict';
const { EnvHttpProxyAgent, setGlobalDispatcher } = require('undici');
setGlobalDispatcher(new EnvHttpProxyAgent());
