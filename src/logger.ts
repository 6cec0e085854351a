// pino JSON logs. Secrets and tokens are kept out by construction (no code logs them), and
// redaction is the second line of defence for field names that could carry one.
import { pino, type DestinationStream, type Logger } from 'pino';
import type { LogLevel } from './config.ts';

export type { Logger };

const REDACT = [
  'clientSecret', '*.clientSecret', 'client_secret', '*.client_secret',
  'accessToken', '*.accessToken', 'access_token', '*.access_token',
  'authorization', '*.authorization', 'headers.authorization',
  'ocp-apim-subscription-key', '*["ocp-apim-subscription-key"]',
  'client_assertion', '*.client_assertion', 'clientAssertion', '*.clientAssertion',
  'privateKey', '*.privateKey', 'private_key', '*.private_key',
];

export function createLogger(level: LogLevel, destination?: DestinationStream): Logger {
  return pino(
    {
      level,
      base: { service: 'oauth2-extproc' },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
      redact: { paths: REDACT, censor: '[redacted]' },
    },
    destination ?? pino.destination({ fd: 1, sync: false }),
  );
}
