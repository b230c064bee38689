import type pg from "pg";
export declare const SCHEMAS: string[];
export declare const SCHEMA_DUMP_PATH: string;
export declare function dumpSchema(client: pg.ClientBase): Promise<string>;
