import assert from 'node:assert/strict';
import { test } from 'node:test';
import { stripQueryParameters } from '../src/header-mutation.ts';

test('stripQueryParameters removes exactly the named parameters, keeping the rest byte for byte', () => {
  const names = ['subscription-key'];
  const cases: Array<[string, string | undefined]> = [
    ['/a', undefined],
    ['/a?x=1', undefined],
    ['/a?subscription-keys=1', undefined],
    ['/a?subscription-key=k', '/a'],
    ['/a?subscription-key', '/a'],
    ['/a?x=1&subscription-key=k', '/a?x=1'],
    ['/a?subscription-key=k&x=%20y+z&subscription-key=k2&y', '/a?x=%20y+z&y'],
    ['/a?subscription%2Dkey=k&x=1', '/a?x=1'],
    ['/a?&&subscription-key=k&', '/a'],
    ['/a?x=%E0%A4%A', undefined],
    ['/a?Subscription-Key=k&x=1', '/a?x=1'],
    ['/a?%53UBSCRIPTION-KEY=k', '/a'],
  ];
  for (const [path, expected] of cases) assert.equal(stripQueryParameters(path, names), expected, path);
  assert.equal(stripQueryParameters('/a?subscription-key=k', []), undefined);
});
